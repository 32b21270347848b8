"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad option, missing data, wrong weights file)."""


class Diverged(UserError):
    """Training produced a non-finite loss: nothing of it is saved as a model."""


NO_SPACE_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def no_space(what: str, where, need: int | None = None) -> UserError:
    """One line for a full disk: what could not be written, where, how much it needed and had."""
    import shutil

    try:
        free = f", {size_text(shutil.disk_usage(where).free)} free"
    except OSError:
        free = ""
    needed = f" needs {size_text(need)}" if need is not None else " does not fit"
    return UserError(f"no space left for {what} in {where}:{needed}{free}; free some space or write elsewhere")


def size_text(count: int) -> str:
    """Bytes as people read them: 300 KB, 12.5 MB, 3.1 GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"


def excerpt(value, limit: int = 80) -> str:
    """A value's repr, short whatever its size (a few items per level, a few levels): what an
    error message shows of a value it did not expect."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
