"""The shape of the house: modules import downward only, with no cycles; every run setting is
declared once (its flag is generated from the RunConfig field); functions fit on a screen."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "warmstart"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The warmstart modules `path` imports, at the top or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            found.update(n if (PACKAGE.parent / (n.replace(".", "/") + ".py")).is_file()
                         or (PACKAGE.parent / n.replace(".", "/")).is_dir() else target for n in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("warmstart"):
            found.add(node.module)
    return found - {module}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


# the layers, lowest first: a module imports only from its own layer's package or a layer below
LAYERS = [
    {"_version", "errors", "files", "seeds", "stop", "progress", "recipes", "calibration"},  # what everything uses
    {"data"},  # sources -> transforms -> loaders, caches
    {"models"},  # create, restore, choose what trains
    {"config", "run_dir"},  # the run's settings, and its directory
    {"compute"},  # device, precision, pipeline and loaders; processes (below training AND evaluation)
    {"evaluate"},
    {"train"},
    {"predict", "quantize", "export"},
    {"serve", "report", "tune", "audit", "quickstart"},
    {"cli", "__main__"},
    {"warmstart"},  # the package's own __init__: the library's front door
]


def _layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else module
    found = [i for i, names in enumerate(LAYERS) if top in names]
    assert found, f"{module}: place {top} in a layer of LAYERS"
    return found[0]


def test_modules_import_downward_only():
    """No upward import: e.g. evaluation uses the runtime from compute/, never from train/."""
    upward = sorted((m, d) for m, deps in _graph().items() for d in deps
                    if m.split(".")[:2] != d.split(".")[:2] and _layer_of(d) > _layer_of(m))
    assert upward == []


def test_no_module_imports_the_package_itself():
    upward = sorted(m for m, deps in _graph().items() if "warmstart" in deps and m != "warmstart")
    assert upward == []


def _edges() -> dict[str, set[str]]:
    """Who imports whom, with the package __init__ files Python runs on the way: importing `a.b.c`
    from outside the package `a.b` runs `a/b/__init__.py` first."""
    graph = _graph()
    edges = {}
    for module, deps in graph.items():
        own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}  # itself and its packages
        implied = {d.rsplit(".", i)[0] for d in deps for i in range(1, d.count(".") + 1)}
        edges[module] = {d for d in deps | (implied - own) if d in graph}
    return edges


def test_there_are_no_import_cycles():
    edges, cycles, state = _edges(), [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_every_run_setting_has_exactly_one_train_flag_and_back():
    import dataclasses

    from warmstart.cli import build_parser
    from warmstart.config import RunConfig

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    dests = {a.dest for a in train._actions} - {"help", "config", "nproc", "resume", "resume_weights_only"}
    assert dests == {f.name for f in dataclasses.fields(RunConfig)}


def test_a_new_setting_is_one_field(tmp_path):
    """A field declared in a RunConfig subclass gets its flag, its check and its YAML key."""
    import argparse
    import dataclasses

    from warmstart import cli
    from warmstart.config import RunConfig, setting
    from warmstart.errors import UserError

    @dataclasses.dataclass
    class Extended(RunConfig):
        warmup_images: int = setting(0, "images to warm up on", group="optimisation", bounds="[0, inf)")

    parser = argparse.ArgumentParser()
    original = cli.RunConfig
    try:
        cli.RunConfig = Extended
        cli._add_train_options(parser)
    finally:
        cli.RunConfig = original
    args = parser.parse_args(["--warmup-images", "64", "--data", "x"])
    assert vars(args)["warmup_images"] == 64
    assert Extended.from_dict({"data": "x", "warmup_images": "128"}).warmup_images == 128
    with pytest.raises(UserError, match="--warmup-images -1 is not valid: it must be >= 0"):
        Extended.from_dict({"data": "x", "warmup_images": -1})


def test_functions_fit_on_a_screen():
    """At most two functions over 60 lines (none over 100) and none with more than 8 parameters."""
    long, wide = [], []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                args = node.args
                count = len(args.posonlyargs + args.args + args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
                count -= bool(args.args) and args.args[0].arg in ("self", "cls")
                where = f"{path.relative_to(PACKAGE)}:{node.name}"
                if lines > 60:
                    long.append((lines, where))
                if count > 8:
                    wide.append((count, where))
    assert len(long) <= 2 and all(lines <= 100 for lines, _ in long), sorted(long)
    assert wide == []


@pytest.mark.parametrize("command, settings_class", [("serve", "warmstart.serve.settings:ServeSettings"),
                                                     ("tune", "warmstart.tune.study:StudyOptions")])
def test_serve_and_tune_options_are_their_settings_declared_once(command, settings_class):
    """Each field of ServeSettings / StudyOptions is exactly one option of its command, and back;
    its bounds are checked by the dataclass (one line, exit 2 from the command)."""
    import dataclasses
    import importlib

    from warmstart.cli import build_parser

    module, name = settings_class.split(":")
    cls = getattr(importlib.import_module(module), name)
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    extra = {"tune": {"config", "space", "trials"}}.get(command, set())
    assert {a.dest for a in parser._actions} - {"help"} - extra == {f.name for f in dataclasses.fields(cls)}


def test_fewer_than_60_options_are_written_by_hand():
    source = (PACKAGE / "cli.py").read_text()
    assert source.count(".add_argument(") < 60


def test_a_new_data_source_is_one_module_and_one_line(tmp_path, monkeypatch):
    """A source is a module with detect() and load(); listing it in SOURCES is all it takes."""
    import types

    from warmstart.data import sources
    from warmstart.data.imageset import ImageSet

    def load(data, class_ids, options):
        return {"all": ImageSet([f"{data}/{i}.jpg" for i in range(6)], [0, 1] * 3, ["cat", "dog"], ["cat", "dog"])}

    pets = types.SimpleNamespace(detect=lambda data: data.startswith("pets:"), load=load)
    monkeypatch.setattr(sources, "SOURCES", [pets, *sources.SOURCES])
    splits = sources.resolve_splits("pets:home", 0.5, 0)
    assert splits["train"].class_names == ["cat", "dog"] and len(splits["train"]) + len(splits["val"]) == 6


def test_every_package_and_module_is_named_in_architecture_md():
    """The map is complete: each package under src/warmstart/ (as `name/`) and each top-level
    module (as `name` or `name.py`) appears in ARCHITECTURE.md."""
    text = (PACKAGE.parents[1] / "ARCHITECTURE.md").read_text()
    packages = [p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE]
    modules = [p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")]
    missing = [f"{p}/" for p in packages if f"`{p}/" not in text]
    missing += [m for m in modules if f"`{m}`" not in text and f"`{m}.py" not in text and f"`{m} " not in text]
    assert missing == [], f"ARCHITECTURE.md does not name: {missing}"
