"""Errors that carry a message meant for the user: the CLI prints them without a traceback."""


class NanoseekError(Exception):
    """Base class for errors caused by user input (files, fields, values), not by a bug."""


class ConfigError(NanoseekError, ValueError):
    """A config.json or a config field is missing, of an unknown kind, or inconsistent."""


class CheckpointError(NanoseekError, ValueError):
    """A checkpoint directory is missing files, holds unsafe formats, or does not match its config."""
