"""Every config a user is told to run (CLI help, README, docs) exists and parses."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.config import load_config

ROOT = Path(__file__).resolve().parents[2]
NAMED = re.compile(r"configs/[A-Za-z0-9_.-]+\.yaml")


def _help_texts() -> str:
    out = []
    for name in cli.list_commands(None):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        out.append(result.output)
    return "\n".join(out)


def test_configs_named_in_help_and_docs_exist_and_parse():
    texts = {"quantkit --help": _help_texts(), "README.md": (ROOT / "README.md").read_text()}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))})
    named = {m: where for where, text in texts.items() for m in NAMED.findall(text)}
    assert len(named) >= 5  # the help and README do name configs
    missing = {m: where for m, where in named.items() if not (ROOT / m).is_file()}
    assert not missing, f"named but not in configs/: {missing}"
    for m in named:
        load_config(ROOT / m)
