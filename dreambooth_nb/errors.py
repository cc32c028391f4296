"""The one family of errors the package raises on purpose.

Every `DreamboothError` carries a message written for the notebook user: what went wrong, which file
or setting it concerns, and what to do. Notebooks show the message alone, never a stack trace.
"""


class DreamboothError(Exception):
    """Base class: an expected failure with a message that tells the user what to do."""


class ConfigError(DreamboothError, ValueError):
    """A setting is impossible or dangerous; the message names the field and the fix."""


class DataError(DreamboothError):
    """The photos (or class images) cannot be used; the message names the folder or file."""


class TrainingStopped(DreamboothError):
    """Training stopped early (non-finite loss, out of memory, no disk); the last good state is kept."""


class ActionStopped(DreamboothError):
    """A panel's action (drawing a grid, a sweep) stopped by the person; the message says what was kept."""


class ExportError(DreamboothError):
    """A snapshot cannot be written as a single file; the message names it and says what to do."""
