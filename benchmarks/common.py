"""What every benchmark shares: where results go and how they are written, the summary statistics,
the plotting set-up, and where the traces are (`--trace`). Scripts run as modules from the repo
root: `python -m benchmarks.<name>`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
# The team's traces live beside the checkout (../shared/traces); `--trace` names any other file.
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"


def write_results(name: str, doc: str, report: dict, table: str, *, write_json: bool = True) -> None:
    """`results/<name>.json` (the whole report) and `results/<name>.md` (doc, config, table)."""
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if write_json:
        path.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    header = f"# {Path(name).name}\n\n{doc.strip()}\n\nConfig: `{json.dumps(report['config'], default=str)}`\n\n"
    path.with_suffix(".md").write_text(header + table.rstrip("\n") + "\n")
    print(table)


def stats(xs: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and P99 of `xs` (the figures every table reports); None for no samples (JSON-safe)."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def geo_mean(xs: Sequence[float]) -> float:
    """The geometric mean: how ratios (to a best baseline, of two runs) are averaged here."""
    return float(np.exp(np.mean(np.log(np.asarray(xs, dtype=float)))))


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported only by the scripts that plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(n: int, cols: int, width: float, height: float):
    """A figure of `n` panels, at most `cols` a row (the unused ones hidden): (fig, the n axes)."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def add_trace_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--trace", type=Path, default=DEFAULT_TRACE, help=f"Mooncake-format trace (default: {DEFAULT_TRACE})"
    )


def trace_path(path: Path) -> Path:
    """`path` if it is a file; otherwise exit with a message that says what is missing and how to fix it."""
    if not path.is_file():
        raise SystemExit(f"trace not found: {path} (pass --trace FILE, a Mooncake-format JSONL trace)")
    return path
