"""Where and how every benchmark writes its results: JSON plus a markdown table with its config."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, doc: str, report: dict, table: str, *, write_json: bool = True) -> None:
    """`results/<name>.json` (the whole report) and `results/<name>.md` (doc, config, table)."""
    RESULTS.mkdir(exist_ok=True)
    if write_json:
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    header = f"# {name}\n\n{doc.strip()}\n\nConfig: `{json.dumps(report['config'])}`\n\n"
    (RESULTS / f"{name}.md").write_text(header + table.rstrip("\n") + "\n")
    print(table)
