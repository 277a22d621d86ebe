"""The `quantfx` command line (also `python -m quantfx`). Subcommands: `quantize` (a model to
ONNX + TIDL options), `doctor` (is it ready?), `analyze` (which layer loses accuracy?), `check`
(what a TIDL device runs of an exported ONNX file), `demo` (the whole pipeline on real data).

Errors are one line on stderr and exit status 2 (`--traceback` shows where they came from)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback

from quantfx.arguments import build_parser
from quantfx.errors import QuantFxError

MAX_ERROR_CHARACTERS = 600
"""An error is one readable line: longer messages (a state dict's key list) are cut."""


def run_check(args: argparse.Namespace) -> int:
    """`quantfx check FILE --target T`: print the report; 1 if a node falls back to ARM (or,
    with --strict, if there is a warning)."""
    if not os.path.isfile(args.file):
        what = "is a folder" if os.path.isdir(args.file) else "does not exist"
        print(f"quantfx check: error: {args.file} {what}; give an exported .onnx file.",
              file=sys.stderr)
        return 2

    from quantfx.tidl.checker import check_tidl
    report = check_tidl(args.file, args.target)  # default: the target the file records
    print({"text": str, "markdown": lambda r: r.to_markdown(),
           "json": lambda r: r.to_json()}[args.format](report))
    failed = not report.fully_offloaded or (args.strict and bool(report.warnings()))
    return 1 if failed else 0


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM (a job killed by a scheduler, `timeout`) ends the command like Ctrl-C: the
    cleanup of half-written files runs (Python's default ends without it)."""
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; torch and ONNX Runtime are imported only now."""
    if args.command == "check":
        return run_check(args)
    if args.command == "demo":
        from quantfx.demo import run_from_arguments
        return run_from_arguments(args)
    from quantfx.app import commands
    return {"quantize": commands.run_quantize, "doctor": commands.run_doctor,
            "analyze": commands.run_analyze}[args.command](args)


def _log_to_stderr(args: argparse.Namespace) -> logging.Handler:
    """The command's step lines on stderr: info, debug with -v, only warnings with -q."""
    logger = logging.getLogger("quantfx")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"quantfx {args.command}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if getattr(args, "verbose", False)
                    else logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantfx` console script."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the subcommand's parser: `quantfx demo: error: ... --foo`
        chosen = parser.subcommands[args.command] if args.command else parser
        chosen.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handles_term = hasattr(signal, "SIGTERM") and (
        threading.current_thread() is threading.main_thread())
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_term else None
    handler = _log_to_stderr(args)
    try:
        return run(args)
    except BrokenPipeError:  # `quantfx ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"quantfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one readable line, not a traceback from deep inside torch
        if args.traceback:
            traceback.print_exc()
        known = isinstance(error, QuantFxError)
        message = " ".join(str(error).split()) if known else f"{type(error).__name__}: {error}"
        if len(message) > MAX_ERROR_CHARACTERS and not args.traceback:  # e.g. 13 KB of keys
            message = message[:MAX_ERROR_CHARACTERS - 40].rstrip() + " ... (--traceback: all)"
        hint = "" if known or args.traceback else " (run with --traceback for details)"
        print(f"quantfx {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger("quantfx").removeHandler(handler)
        logging.getLogger("quantfx").setLevel(logging.NOTSET)
        if handles_term:
            signal.signal(signal.SIGTERM, previous)


def console() -> None:
    """The console script: `main`, then a SIGTERM that arrives while Python shuts down (after
    the files are complete) still ends with 130, as docs/cli.md says, not the default 143."""
    code = main()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: os._exit(130))
    sys.exit(code)


if __name__ == "__main__":
    console()
