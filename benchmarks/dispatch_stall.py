"""Does KV-event ingestion delay dispatch? Dispatch latency with and without events streaming.

The controller's own loop (`dispatch_loop.DispatchLoop`, `KvmulRouter.apply_update`, `RankEventStream`,
`KvmulRouter`) runs here in one process. Separate processes play the rest, over loopback ZMQ:
  * per rank, SGLang's real `ZmqEventPublisher` streams BlockStored batches of conversation trees
    (as in decision_latency.py) at `--event-rate` tokens/s in total;
  * a request sender pushes `--request-rate` prompts/s (8k tokens sharing system prompts), each
    stamped with its send time (CLOCK_MONOTONIC, shared by all processes).
Dispatch latency = send -> decided (`KvmulRouter.decide`; decisions are not committed, so no
in-flight credit piles up without load snapshots). Phases: no events; events with the bounded
slices the controller uses; events drained whole per wake-up (the old loop), for contrast.
Writes JSON, a markdown table and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import pickle
import time

import numpy as np
import zmq
from tqdm import tqdm

from benchmarks.common import RESULTS, pyplot, write_results
from benchmarks.decision_latency import VOCAB, rank_prompts, stored_events
from sglang_kvmul.core.router import KvmulRouter
from sglang_kvmul.launch.ports import free_port_range
from sglang_kvmul.serving.dispatch_loop import DispatchLoop
from sglang_kvmul.serving.dispatcher import KvmulDispatcher
from sglang_kvmul.serving.kv_events import RankEventStream
from sglang_kvmul.serving.settings import KvmulSettings

PAGE = 16
SLICE = KvmulSettings().slice_batches


def publisher(rank: int, port: int, replay_port: int, tokens_per_s: float, seconds: float, ready, go) -> None:
    """One rank's real SGLang publisher streaming stored pages at `tokens_per_s`."""
    from sglang.srt.disaggregation.kv_events import KVEventBatch, ZmqEventPublisher

    rng = np.random.default_rng(100 + rank)
    systems = [np.random.default_rng(7 + i).integers(0, VOCAB, 2048).tolist() for i in range(4)]
    events = stored_events(rank_prompts(rng, systems, int(tokens_per_s * seconds * 1.2), 20000)[0], PAGE)
    pub = ZmqEventPublisher(
        attn_dp_rank=0, endpoint=f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay_port}", bind=True
    )
    ready.set()
    go.wait()
    t0 = time.monotonic()
    sent = 0
    for ev in events:
        if time.monotonic() - t0 > seconds:
            break
        pub.publish(KVEventBatch(ts=time.time(), events=[ev]))
        sent += len(ev.token_ids)
        ahead = sent / tokens_per_s - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)  # pacing the stream to its rate
    pub._event_queue.join()
    pub.shutdown()


def sender(port: int, rate: float, seconds: float, ready, go) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    ready.set()
    go.wait()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        push.send(pickle.dumps((time.monotonic(), i)))
        i += 1
        ahead = i / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)  # pacing the requests to their rate
    push.send(b"done")
    push.close(linger=5000)
    ctx.term()


def _helpers(args: argparse.Namespace, events: bool, ctx: zmq.Context, req_port: int, go) -> tuple:
    """The request sender and (with `events`) one real publisher per rank, with the streams reading them."""
    spawn = mp.get_context("spawn")
    ready = [spawn.Event()]
    procs = [spawn.Process(target=sender, args=(req_port, args.request_rate, args.seconds, ready[0], go))]
    streams = []
    if events:
        for r in range(args.ranks):
            port = free_port_range(1, {req_port})
            replay = free_port_range(1, {req_port, port})
            rate = args.event_rate / args.ranks
            ready.append(spawn.Event())
            procs.append(spawn.Process(target=publisher, args=(r, port, replay, rate, args.seconds, ready[-1], go)))
            streams.append(RankEventStream(ctx, r, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}"))
    return procs, ready, streams


def run_phase(args: argparse.Namespace, events: bool, slice_batches: int | None, prompts: list[list[int]]) -> dict:
    go = mp.get_context("spawn").Event()
    ctx = zmq.Context()
    req_port = free_port_range(1)
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{req_port}")
    procs, ready, streams = _helpers(args, events, ctx, req_port, go)
    for p in procs:
        p.start()
    router = KvmulRouter(args.ranks, PAGE)
    latencies: list[float] = []
    done = False

    def drain_requests() -> None:
        nonlocal done
        while True:
            try:
                msg = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg == b"done":
                done = True
                return
            sent, i = pickle.loads(msg)
            prompt = prompts[i % len(prompts)]
            router.decide(prompt, limit=len(prompt) - 1)
            latencies.append((time.monotonic() - sent) * 1e6)

    ingest = KvmulDispatcher(router, [], None, streams).ingest  # the controller's own ingestion path
    loop = DispatchLoop(pull, streams, drain_requests, ingest, slice_batches)
    gc_pauses: list[float] = []
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_pauses.append((time.perf_counter() - gc_start[0]) * 1e6)

    gc.callbacks.append(on_gc)
    for ev in ready:  # publishers have built their events and bound; the sender has connected
        if not ev.wait(timeout=600):
            raise TimeoutError("a helper process never got ready")
    go.set()  # a stream that misses its first batches (slow joiner) replays them: the real recovery path
    t0 = time.monotonic()
    while not done:
        loop.run_once(100)
    wall = time.monotonic() - t0
    gc.callbacks.remove(on_gc)
    for p in procs:
        p.join(timeout=60)
    mirrored = sum(m.num_tokens for m in router.mirrors)
    for s in streams:
        s.close()
    pull.close(linger=0)
    ctx.term()
    return _summary(latencies, events, slice_batches, mirrored / wall, gc_pauses)


def _summary(latencies: list[float], events: bool, slice_batches: int | None, tokens_per_s: float, gc_pauses) -> dict:
    lat = np.asarray(latencies)
    return {
        "events": events,
        "slice_batches": slice_batches,
        "requests": len(latencies),
        "median_us": float(np.median(lat)),
        "p99_us": float(np.percentile(lat, 99)),
        "max_us": float(lat.max()),
        "ingested_tokens_per_s": tokens_per_s,
        "gc_max_pause_us": max(gc_pauses, default=0.0),
        "samples": latencies,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--event-rate", type=float, default=2e6, help="stored tokens per second, all ranks")
    ap.add_argument("--request-rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--name", default="dispatch_stall")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    systems = [np.random.default_rng(7 + i).integers(0, VOCAB, 2048).tolist() for i in range(4)]
    prompts = [systems[i % 4] + rng.integers(0, VOCAB, 6144).tolist() for i in range(64)]
    phases = [("no events", False, SLICE), ("events, bounded slices", True, SLICE),
              ("events, whole backlog", True, None)]  # fmt: skip
    runs = []
    for label, events, slice_batches in tqdm(phases, desc="phases"):
        run = run_phase(args, events, slice_batches, prompts)
        run["phase"] = label
        runs.append(run)
        tqdm.write(f"{label}: median {run['median_us']:.0f} us, p99 {run['p99_us']:.0f} us, max {run['max_us']:.0f} us")
    lines = [
        "| phase | requests | dispatch median us | p99 | max | ingested tokens/s | longest GC pause us |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['phase']} | {r['requests']} | {r['median_us']:.0f} | {r['p99_us']:.0f} | {r['max_us']:.0f} | "
            f"{r['ingested_tokens_per_s']:.3g} | {r['gc_max_pause_us']:.0f} |"
        )
    base = runs[0]
    lines.append(
        f"\nWith events streaming (bounded slices), dispatch p99 is {runs[1]['p99_us'] / base['p99_us']:.2f}x and "
        f"median {runs[1]['median_us'] / base['median_us']:.2f}x the no-event run."
    )
    report = {"config": vars(args), "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs]}
    write_results(args.name, __doc__, report, "\n".join(lines))

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs = np.sort(r["samples"])
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=r["phase"])
    ax.set_xscale("log")
    ax.set_xlabel("dispatch latency (us): request sent -> decided")
    ax.set_ylabel("CDF")
    ax.set_title(f"{args.ranks} ranks, events {args.event_rate:.2g} tokens/s, {args.request_rate:g} requests/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
