"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad option, missing data, wrong weights file)."""


NO_SPACE_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def no_space(what: str, where, need: int | None = None) -> UserError:
    """One line for a full disk: what could not be written, where, how much it needed and had."""
    import shutil

    try:
        free = f", {shutil.disk_usage(where).free / 2**20:,.0f} MB free"
    except OSError:
        free = ""
    needed = f" needs {need / 2**20:,.1f} MB" if need is not None else " does not fit"
    return UserError(f"no space left for {what} in {where}:{needed}{free}; free some space or write elsewhere")


def excerpt(value, limit: int = 80) -> str:
    """A value's repr, short whatever its size (a few items per level, a few levels): what an
    error message shows of a value it did not expect."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
