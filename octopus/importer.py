"""Import the application class named ``module:Class``.

Runs in workers (after fork, so a reload imports fresh code) and in
``octopusd check``; never in the master.
"""

from __future__ import annotations

import importlib
import os
import sys
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
            raise AppImportError(f"{prefix}: {_last_line(exc)}") from None
        raise AppImportError(f"{prefix}: no module named {module_name!r}") from None
    except Exception as exc:
        raise AppImportError(f"{prefix}: {_last_line(exc)}") from None
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
        return f"{line} ({os.path.basename(exc.filename)}, line {exc.lineno})"
    return line
