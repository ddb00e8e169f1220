"""Replay a `sglang_kvmul.sim.workloads` request list with SGLang's own `bench_serving` client.

bench_serving has no input that sends pre-tokenized prompts at their own arrival times (its
`mooncake` option rebuilds shorter text prompts), so this adds one dataset, `kvmul-trace`, to its
dataset table and then runs bench_serving's unchanged path: its own CLI parser and defaults,
`--use-trace-timestamps`, streaming `/generate` with `input_ids`, `--cache-report` for SGLang's
per-request cached tokens, `--output-details` for the raw per-request JSONL line.

One upstream bug is worked around: bench_serving 0.5.23 parses `--use-trace-timestamps` but calls
`get_request(input_requests, request_rate)` without it for every dataset except `mooncake`, so all
requests leave at once (request rate defaults to inf). During our replay `get_request` is called
with `use_trace_timestamps=True`; `replay` checks that the run lasted as long as the trace.
"""

from __future__ import annotations

import functools
import json
import sys
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from sglang.benchmark import datasets as bench_datasets
from sglang.benchmark import serving as bench_serving
from sglang.benchmark.datasets.common import BaseDataset, DatasetRow

from sglang_kvmul.sim.workloads import TraceRequest

TRACE_DATASET = "kvmul-trace"


@dataclass
class TraceFileDataset(BaseDataset):
    """JSONL rows `{"t_ms", "input_ids", "output_len"}` -> bench_serving rows with trace timestamps."""

    dataset_path: str

    @classmethod
    def from_args(cls, args: Namespace) -> TraceFileDataset:
        return cls(dataset_path=args.dataset_path)

    def load(self, tokenizer: object = None, model_id: str | None = None) -> list[DatasetRow]:
        rows = []
        with open(self.dataset_path) as fh:
            for line in fh:
                r = json.loads(line)
                ids, out = r["input_ids"], r["output_len"]
                rows.append(DatasetRow(prompt=ids, prompt_len=len(ids), output_len=out, timestamp=r["t_ms"]))
        return rows


def write_trace(reqs: Sequence[TraceRequest], path: Path) -> None:
    with open(path, "w") as fh:
        for r in reqs:
            fh.write(json.dumps({"t_ms": r.arrival * 1000.0, "input_ids": r.input_ids, "output_len": r.output_len}))
            fh.write("\n")


def parse_args(argv: Sequence[str]) -> Namespace:
    """bench_serving's own CLI parser and defaults (its `--dataset-name` choices do not list ours, so
    parse as `custom` and switch the name afterwards)."""
    captured: list[Namespace] = []
    with (
        mock.patch.object(sys, "argv", ["bench_serving", *argv, "--dataset-name", "custom"]),
        mock.patch.object(bench_serving, "run_benchmark", captured.append),
    ):
        bench_serving.cli_main()
    args = captured[0]
    args.dataset_name = TRACE_DATASET
    return args


def replay(
    base_url: str, trace: Path, output: Path, model: str, *, tqdm_off: bool = False, extra: Sequence[str] = ()
) -> dict:
    """Run bench_serving against `base_url`; returns its result dict (metrics + per-request details)."""
    bench_datasets.DATASET_MAPPING.setdefault(TRACE_DATASET, TraceFileDataset)
    argv = [
        "--backend", "sglang",
        "--base-url", base_url,
        "--model", model,
        "--tokenizer", model,
        "--dataset-path", str(trace),
        "--num-prompts", "1000000",
        "--use-trace-timestamps",
        "--warmup-requests", "0",
        "--cache-report",
        "--output-details",
        "--output-file", str(output),
        *(["--disable-tqdm"] if tqdm_off else []),
        *extra,
    ]  # fmt: skip
    args = parse_args(argv)
    stamps = [row.timestamp for row in TraceFileDataset(str(trace)).load()]
    span_s = (max(stamps) - min(stamps)) / 1000.0  # bench_serving starts the clock at the first request
    paced = functools.partial(bench_serving.get_request, use_trace_timestamps=True)
    with mock.patch.object(bench_serving, "get_request", paced):
        result = bench_serving.run_benchmark(args)
    if result["duration"] < span_s:
        raise RuntimeError(f"replay took {result['duration']:.1f} s, shorter than the trace ({span_s:.1f} s)")
    return result
