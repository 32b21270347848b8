"""Files written whole or not at all: a temporary file beside the target, synced, then moved over
it. A failure removes the temporary file and leaves the old file as it was; a full disk is one
line (UserError), never a traceback and a half-written file."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import NO_SPACE_ERRNOS, UserError, no_space


@contextmanager
def replacing(path: Path, what: str):
    """Yields an open binary file; once the block ends, its content replaces `path` (`what` names
    it in the full-disk message)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _out_of_space(exc):
            raise no_space(what, path.parent) from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _out_of_space(exc: BaseException | None) -> bool:
    """A full disk here or in what led to it (torch.save's zip writer fails again on cleanup)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def write_atomically(path: Path, data: bytes | str, what: str) -> None:
    with replacing(path, what) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, with aliases expanded


def load_yaml(text: str, source) -> object:
    """YAML as yaml.safe_load reads it, refused (one line) when its aliases expand to more than
    MAX_YAML_VALUES values: nine levels of nine aliases fit in 1 KB and expand to 387 million,
    which any code that walks or prints the value would try to build."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = _expanded_size(node, {})
        if expanded > MAX_YAML_VALUES:
            raise UserError(f"{source}: its YAML aliases expand to {expanded:,} values, over the limit of "
                            f"{MAX_YAML_VALUES:,}: write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict) -> int:
    """Values under `node` with every alias expanded (each shared node counted once per use)."""
    import yaml

    key = id(node)
    if key not in sizes:
        sizes[key] = MAX_YAML_VALUES + 1  # a node inside itself (a recursive alias) expands forever
        if isinstance(node, yaml.SequenceNode):
            sizes[key] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[key] = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        else:
            sizes[key] = 1
    return sizes[key]


def not_a_file(path) -> str | None:
    """Why `path` cannot be read as an image file (None: it is a regular file)."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.exists():
        return "file not found"
    return "a folder, not an image file" if path.is_dir() else "not a regular file (a device, FIFO or socket)"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: what a spreadsheet may run as a formula


def spreadsheet_safe(value):
    """A CSV cell as a spreadsheet will show it, never run it: text starting with one of
    FORMULA_STARTS gets a leading apostrophe (OWASP's CSV-injection rule); numbers stay numbers."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def spreadsheet_safe_row(row) -> list:
    return [spreadsheet_safe(value) for value in row]


def from_spreadsheet_safe(value: str) -> str:
    """A cell of a CSV warmstart wrote, as it was before `spreadsheet_safe`."""
    return value[1:] if value.startswith("'") and value[1:2] and value[1] in "".join(FORMULA_STARTS) else value
