"""The newcomer's pages: a README that fits on a few screens and says what CI runs, and a
documentation site that builds strictly with every flag documented from its declaration."""

import argparse
import importlib.util
import re
from dataclasses import fields
from pathlib import Path

from warmstart.cli import build_parser
from warmstart.config import RunConfig
from warmstart.serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_fits_on_a_few_screens_and_names_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", readme)
    assert len(commands) == 2  # the quickstart and the test suite
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme):
        assert (ROOT / link).is_file(), link


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_declared_setting_is_in_the_command_line_reference():
    reference = _hooks().cli_reference()
    sections = dict(re.findall(r"## `warmstart ([a-z -]+)`\n(.*?)(?=\n## `|\Z)", reference, re.S))
    for command, settings in (("train", RunConfig), ("serve", ServeSettings)):
        for f in fields(settings):
            if "group" not in f.metadata or f.metadata["positional"]:
                continue  # not a setting (the names given explicitly), or a positional argument
            flag = f.name.replace("_", "-")
            assert f"`--{flag}" in sections[command] or f"`--no-{flag}`" in sections[command], (command, f.name)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - {"data"} <= set(sections)  # every command has its section


def test_the_pages_made_from_the_repository_are_included():
    """The site itself is built with `mkdocs build --strict` by .ci/run (a broken link or a missing
    page fails CI there); here, what the hook puts into the pages."""
    hooks = _hooks()
    page = hooks.on_page_markdown("# Benchmarks\n\n<!-- include BENCHMARKS.md -->\n<!-- api -->", None, None, None)
    assert "### 14. The inference engine" in page and "<!--" not in page
    assert "## `warmstart.train`" in page and "warmstart train` in Python" in page
    assert (ROOT / "mkdocs.yml").read_text().count("strict: true") == 1
