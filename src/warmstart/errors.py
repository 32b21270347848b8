"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad option, missing data, wrong weights file)."""
