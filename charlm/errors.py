"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class CharlmError(Exception):
    """Something the user can fix (a config, a path, a text); the message says what and how."""
