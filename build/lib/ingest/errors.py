"""Errors the CLI turns into one clear line (no traceback)."""


class UserFacingError(Exception):
    """Bad input or an unreachable resource; the message says what and how to fix it."""


class LoadError(UserFacingError):
    """A model or SAE could not be loaded (offline, missing files, or it does not fit)."""
