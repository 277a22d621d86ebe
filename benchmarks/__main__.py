"""`python -m benchmarks [PART ...]`: run all parts (or the named ones), write docs/benchmarks.*."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.report import command_line, markdown_table, write_report

# Part name -> "module" with `run(progress: bool) -> PartResult`, or "module:function", in
# report order.
PARTS = {
    "accuracy": "benchmarks.accuracy",
    "speed": "benchmarks.speed",
    "prepare_speed": "benchmarks.prepare_speed",
    "coverage": "benchmarks.coverage",
    "qat_step": "benchmarks.deployment:run_qat_step",
    "onnx_runtime": "benchmarks.deployment:run_onnx_runtime",
    "tidl_profiles": "benchmarks.tidl_profiles",
    "analyze_speed": "benchmarks.analyze_speed",
    "hard_cases": "benchmarks.hard_cases",
    "detection": "benchmarks.detection",
    "detector": "benchmarks.detector_accuracy",
    "real_models": "benchmarks.real_models",
    "face_detection": "benchmarks.face_detection",
    "distill": "benchmarks.distill",
    "transformers": "benchmarks.transformers",
    "reconstruction_cost": "benchmarks.reconstruction_cost",
}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts in order, then merge their results into the report."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="quantfx benchmarks; writes docs/benchmarks.md, docs/benchmarks.json and "
                    "PNG plots in docs/. Parts run alone replace only their own section.",
    )
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"parts to run (default: all): {', '.join(PARTS)}")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-write", action="store_true",
                        help="print the tables but leave docs/ untouched")
    args = parser.parse_args(argv)
    unknown = [name for name in args.parts if name not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    chosen = args.parts or list(PARTS)
    results = []
    for name in chosen:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module_name, _, function_name = PARTS[name].partition(":")
        part = getattr(importlib.import_module(module_name), function_name or "run")
        result = part(progress=not args.no_progress)
        result.seconds = time.perf_counter() - start
        result.finished_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results.append(result)
        for table in result.tables:
            print(markdown_table(table), flush=True)
        if not args.no_write:  # write after every part: a later crash keeps earlier results
            write_report([result], list(PARTS), command_line())
        print(f"[benchmarks] {name} done in {result.seconds:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
