"""The one exception users see: a clear line, no traceback (the CLI prints it and exits non-zero)."""


class RetroError(Exception):
    """Bad input or a DB in the wrong state. The message names the file/field and what to do."""
