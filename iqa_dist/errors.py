"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration: the CLI prints the message and exits non-zero.

    The message must name the file, row or field at fault and say why.
    """

    exit_code = 2


def out_of_space(error: BaseException, where=None) -> bool:
    """Whether a failed write ran out of disk: ENOSPC anywhere in the chain of causes, or, since
    torch's serializer loses the errno ("unexpected pos ... basic_ios::clear"), a file system at
    `where` with almost nothing left free right after the failure (call it before cleaning up)."""
    import errno
    import shutil

    if where is not None:
        try:
            if shutil.disk_usage(where).free < 16 * 2**20:
                return True
        except OSError:
            pass
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def no_space(path, need_bytes: int, what: str, then: str) -> UserError:
    """The one line for a full disk: which file system (its mount point), how much the write needs."""
    import os
    import shutil
    from pathlib import Path

    mount = Path(path).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = shutil.disk_usage(mount).free
    return UserError(f"no space left on {mount} for {what} (needs ~{max(1, round(need_bytes / 1e6))} MB, "
                     f"{free / 1e6:.0f} MB free); {then}")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first line for a one-line message: whole when short, else cut at a word
    and marked " ...", never mid-word (a library's message can be a screenful)."""
    import textwrap

    line = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
    return textwrap.shorten(line, limit, placeholder=" ...") if len(line) > limit else line
