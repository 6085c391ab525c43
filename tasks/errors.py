"""Errors a user can act on: the stage prints the message (no traceback) and exits non-zero."""


class StageError(Exception):
    """Bad params, bad data or a failed run, with a message that says what to change."""
