"""Errors a user can cause.

Library code raises these; only ``octopus.cli`` turns them into an exit code.
``str(error)`` is the one line the user sees, naming the cause.
"""


class OctopusError(Exception):
    """An error caused by configuration, environment or input, not by a bug."""


class ConfigError(OctopusError):
    """A setting, config file or address is invalid."""


class BindError(OctopusError):
    """A listening socket could not be created."""


class AppImportError(OctopusError):
    """The application (``module:Class``) could not be imported.

    ``details``: the full traceback when the application's own code raised,
    for the log (the one line names the file and line)."""

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details
