"""Import the application class named ``module:Class``.

Runs in workers (after fork, so a reload imports fresh code) and in
``octopusd check``; never in the master.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback

from octopus.core.connection import SocketConnection
from octopus.errors import AppImportError


def prepare_path(chdir: str | None, pythonpath: tuple[str, ...]) -> None:
    """Change directory and put it and ``pythonpath`` first on the import path."""
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise AppImportError(f"cannot change directory to {chdir!r}: {exc.strerror}") from None
    for entry in (os.getcwd(), *pythonpath):
        path = os.path.abspath(entry)
        if path not in sys.path:
            sys.path.insert(0, path)
    importlib.invalidate_caches()


def import_app(spec: str | None) -> type[SocketConnection]:
    """The class named by ``spec``; AppImportError with one line otherwise."""
    if not spec:
        raise AppImportError("no application given: set app = \"module:Class\" or pass --app")
    module_name, _, qualname = spec.partition(":")
    prefix = f"cannot import app {spec!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise AppImportError(f"{prefix}: {_last_line(exc)}{_where(exc)}",
                                 details="".join(traceback.format_exception(exc))) from None
        raise AppImportError(f"{prefix}: no module named {module_name!r}") from None
    except SyntaxError as exc:  # the location is in the exception; no traceback to show
        raise AppImportError(f"{prefix}: {_last_line(exc)}") from None
    except Exception as exc:
        raise AppImportError(f"{prefix}: {_last_line(exc)}{_where(exc)}",
                             details="".join(traceback.format_exception(exc))) from None
    target: object = module
    for name in qualname.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise AppImportError(
                f"{prefix}: module {module_name!r} has no attribute {qualname!r}"
            ) from None
    if not (isinstance(target, type) and issubclass(target, SocketConnection)):
        raise AppImportError(f"{prefix}: {qualname!r} is not a SocketConnection subclass")
    return target


def _last_line(exc: BaseException) -> str:
    """``SyntaxError: invalid syntax (app.py, line 3)``: the exception, with where it is."""
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{line} ({_display(exc.filename)}, line {exc.lineno})"
    return line


def _where(exc: BaseException) -> str:
    """`` (app.py, line 12)``: the innermost frame of the traceback in the
    application's own code (not Python's library, installed packages, the
    import machinery or octopus); the innermost frame if none is."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith("<")]
    if not frames:
        return ""
    own = [frame for frame in frames if not _is_library(frame.filename)]
    frame = (own or frames)[-1]
    return f" ({_display(frame.filename)}, line {frame.lineno})"


_LIBRARY_DIRS = tuple(
    os.path.join(os.path.realpath(path), "")
    for path in {*(sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib",
                                                          "platlib")),
                 os.path.dirname(__file__)}  # octopus itself
    if path and os.path.realpath(path) != "/"
)


def _is_library(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_LIBRARY_DIRS)


def _display(filename: str) -> str:
    """The file as the user would name it: relative to the working directory
    when it lies below it."""
    relative = os.path.relpath(filename)
    return filename if relative.startswith("..") else relative
