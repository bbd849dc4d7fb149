"""The one exception the CLI shows to users: a one-paragraph message, no traceback, exit code 2."""

from __future__ import annotations

import errno


class CliError(Exception):
    """Bad input or a stopped run, explained for a person: what is wrong and how to fix it."""

    exit_code = 2


def describe_os_error(e: OSError) -> str:
    """'Cannot write <file>: <reason>. <what to do>.' for a failed file operation (full disk, read-only, ...)."""
    where = f" '{e.filename}'" if e.filename else ""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free some space on that disk (or choose an output on another one)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "Choose a folder you can write to"
    else:
        fix = "Check the path and the disk"
    return f"The file operation on{where} failed: {reason}. {fix}."
