"""The one exception type that the command line turns into `stbench: error: ...` and exit code 2."""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, never a traceback."""
