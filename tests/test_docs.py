"""The newcomer's pages: a README that fits on a few screens and says what CI runs, and a
documentation site that builds strictly with every flag documented from its declaration."""

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

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


@pytest.mark.slow  # an end-to-end run: outside the inner loop
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the [docs] extra is not installed")
def test_the_documentation_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    done = subprocess.run([mkdocs, "build", "--strict", "-q", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "--calibration-fit" in cli and "--max-inflight-mb" in cli  # a training and a serving setting
    assert "§14" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()  # BENCHMARKS.md included
