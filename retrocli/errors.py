"""The one exception users see: a clear line, no traceback (the CLI prints it and exits non-zero)."""

from __future__ import annotations

import errno


class RetroError(Exception):
    """Bad input or a DB in the wrong state. The message names the file/field and what to do."""


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC or a full quota, as an OSError or as the text of a library's own error (safetensors wraps
    the OS error in its own type)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text
