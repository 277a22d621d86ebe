"""Writing files safely: where files go, temporary files beside them, atomic replacement.

Nothing is half-written: each file is written to a temporary file in its destination folder
and moved into place with `os.replace` only once everything succeeded (the model file first:
no options file is written unless the model is). Files end with the permissions `open()` would
give them under the user's umask (temporary files are created private).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from quantfx.errors import ExportError, QuantFxError

OPTIONS_SUFFIX = ".tidl.json"


def options_path_for(path: str | os.PathLike) -> str:
    """Where the TIDL options of the model at `path` go: `model.onnx` -> `model.tidl.json`."""
    root, _ = os.path.splitext(os.fspath(path))
    return root + OPTIONS_SUFFIX


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_destination(path: str, what: str,
                      error: type[QuantFxError] = ExportError) -> None:
    """Raise `error` unless a file can be written at `path` (a file path, not a folder, in an
    existing writable folder)."""
    if not path or path.endswith((os.sep, "/")) or os.path.isdir(path):
        raise error(f"the {what} path {path!r} is a folder (or empty); give a file path "
                          "such as 'out/model.onnx'.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(f"the folder of the {what} path {path!r} does not exist: create "
                          f"{folder!r} first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"cannot write the {what} into {folder!r}: the folder is not "
                          "writable. Choose another path.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise error(f"the {what} file {path!r} exists and is read-only: make it writable "
                          "or choose another path.")


@contextlib.contextmanager
def staged_files(*finals: str) -> Iterator[list[str]]:
    """Temporary paths beside each of `finals`; on a clean exit they replace the finals in the
    given order with `open()`'s permissions, on any error they are removed."""
    temporaries: list[str] = []
    try:
        for final in finals:
            handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.",
                                                 suffix=".tmp",
                                                 dir=os.path.dirname(os.path.abspath(final)))
            os.close(handle)
            temporaries.append(temporary)
        yield temporaries
        new_file_mode = 0o666 & ~_umask()
        for temporary, final in zip(temporaries, finals):
            # open() keeps an existing file's mode, and gives a new one 0666 minus the umask
            mode = os.stat(final).st_mode & 0o7777 if os.path.exists(final) else new_file_mode
            os.chmod(temporary, mode)
            os.replace(temporary, final)
    finally:
        for leftover in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def write_text_files(contents: dict[str, str]) -> None:
    """Write each path's text atomically, all or none (in the given order)."""
    finals = list(contents)
    with staged_files(*finals) as temporaries:
        for temporary, final in zip(temporaries, finals):
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(contents[final])
