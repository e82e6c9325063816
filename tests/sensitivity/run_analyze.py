"""Entry point for the multi-process tests: ``torchrun --nproc-per-node N tests/sensitivity/run_analyze.py ...``.

Arguments: a config YAML, the workdir and the analysis settings as a JSON string. Every rank calls
:func:`quantkit.sensitivity.analyze.analyze` with the same arguments, exactly as ``quantkit analyze`` would.
"""

from __future__ import annotations

import json
import sys

from quantkit.config import load_config
from quantkit.sensitivity.analyze import analyze

__all__ = ["main"]


def main(argv: list[str]) -> None:
    """Run the analysis of ``argv = [config, workdir, settings_json]`` and print the table path."""
    config, workdir, settings = argv
    path = analyze(load_config(config), workdir, json.loads(settings), progress=False)
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
