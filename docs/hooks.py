"""MkDocs hooks: the pages made from the code's own declarations, so that they cannot drift.

- `<!-- cli-reference -->` becomes every command and its options, from `warmstart.cli.build_parser()`
  (whose training and serving flags are generated from the settings' declarations: `setting()`).
- `<!-- api -->` becomes the signature and docstring of each library call behind a command (API).
- `<!-- include FILE -->` becomes the repository's FILE (BENCHMARKS.md, ARCHITECTURE.md), its title dropped.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"<!-- include ([A-Z]+\.md) -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = markdown.replace("<!-- cli-reference -->", cli_reference()).replace("<!-- api -->", api_reference())
    return INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text().split("\n", 1)[1], markdown)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    takes = action.nargs != 0
    meta = f" {action.metavar or action.dest.upper()}" if takes else ""
    return ", ".join(f"`{name}{meta}`" for name in action.option_strings)


def _default(action: argparse.Action) -> str:
    if not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    return f"`{action.default}`" if action.default != [] else ""


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return _cell(text)


def _commands(parser: argparse.ArgumentParser, prefix: str, out: list[str], helps: dict) -> None:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        own = {c.dest: c.help for c in subs[0]._choices_actions}
        for name, sub in subs[0].choices.items():
            _commands(sub, f"{prefix} {name}", out, {f"{prefix} {name}": own.get(name, "")})
        return
    out += [f"## `{prefix}`", "", _cell(helps.get(prefix) or parser.description or ""), "",
            "| option | default | what it does |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        out.append(f"| {_option(action)} | {_default(action)} | {_help(parser, action)} |")
    out.append("")


def cli_reference() -> str:
    from warmstart.cli import build_parser

    out: list[str] = []
    _commands(build_parser(), "warmstart", out, {})
    return "\n".join(out)


# (the command, the call behind it): the library does whatever the command does
API = [("train", "warmstart.train"), ("train", "warmstart.RunConfig"), ("lr-find", "warmstart.lr_find"),
       ("tune", "warmstart.tune"), ("eval", "warmstart.evaluate"), ("predict", "warmstart.predict"),
       ("export", "warmstart.export.export_run"), ("serve", "warmstart.serve.app.create_app"),
       ("serve", "warmstart.serve.app.serve"), ("report", "warmstart.report.build_report"),
       ("data audit", "warmstart.audit.audit"), ("data check", "warmstart.data.check.check_dataset"),
       ("runs", "warmstart.report.runs.list_runs"), ("compare", "warmstart.report.runs.compare_runs"),
       ("quickstart", "warmstart.quickstart")]


def _resolve(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def api_reference() -> str:
    import inspect

    out = []
    for command, dotted in API:
        thing = _resolve(dotted)
        doc = inspect.getdoc(thing) or ""
        if inspect.isclass(thing):
            doc = doc.split("\n\n")[0]  # a settings class: its fields are the command-line reference's
            signature = "(...)"
        else:
            signature = str(inspect.signature(thing)).replace("'", "")  # annotations are strings here
        out += [f"## `{dotted}`", "", f"`warmstart {command}` in Python.", "",
                f"```python\n{dotted.rsplit('.', 1)[-1]}{signature}\n```", "", doc, ""]
    return "\n".join(out)
