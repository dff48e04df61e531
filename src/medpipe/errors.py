"""Errors a user can act on: the CLI prints their message (no traceback) and exits non-zero."""


class MedpipeError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(MedpipeError):
    """A configuration value or key is wrong; the message names it."""
