"""Errors that reach the user as one clear message (the CLI prints them without a traceback unless --debug).

Every message names what was wrong (file, key or value), what was expected, and how to fix it.
Internal invariants use ``assert``; these classes are for bad input and bad state on disk.
"""


class SndError(Exception):
    """Base class of every error caused by the user's input, configuration or files."""


class ConfigError(SndError, ValueError):
    """A key or value in pipeline.yaml or a command-line override is wrong."""


class DataError(SndError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


class ArtifactError(SndError):
    """An artifact in the store is missing, incomplete or of another schema version."""
