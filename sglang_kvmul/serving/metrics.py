"""Prometheus metrics of the kvmul controller, served on 127.0.0.1 unless told otherwise.

A custom collector reads the router's and the event streams' own counters at scrape time, so
the dispatch path does no metrics work at all.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sglang_kvmul.serving.dispatcher import KvmulDispatcher


class KvmulCollector(Collector):
    def __init__(self, dispatcher: KvmulDispatcher) -> None:
        self.dispatcher = dispatcher
        self.router = dispatcher.router
        self.streams = dispatcher.streams

    def _per_rank(self, family, values) -> GaugeMetricFamily | CounterMetricFamily:
        for rank, value in enumerate(values):
            family.add_metric([str(rank)], value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r = self.router
        st = r.stats
        yield CounterMetricFamily(
            "kvmul_decisions", "Requests booked on a rank (routed by the rule or pinned)", value=st.decisions
        )
        rank = ["rank"]
        yield self._per_rank(
            CounterMetricFamily("kvmul_routed_requests", "Requests sent to each rank", labels=rank),
            st.per_rank_requests,
        )
        yield self._per_rank(
            CounterMetricFamily("kvmul_prompt_tokens", "Prompt tokens sent to each rank", labels=rank),
            st.per_rank_prompt_tokens,
        )
        yield self._per_rank(
            CounterMetricFamily(
                "kvmul_predicted_hit_tokens", "Prompt tokens predicted to be served from each rank's cache", labels=rank
            ),
            st.per_rank_predicted_cached,
        )
        yield self._per_rank(
            GaugeMetricFamily("kvmul_queued_uncached_tokens", "Queued prefill tokens per rank", labels=rank),
            [ld.queued_uncached for ld in r.loads],
        )
        yield self._per_rank(
            GaugeMetricFamily("kvmul_batch_size", "Running + waiting requests per rank", labels=rank),
            [ld.batch_size for ld in r.loads],
        )
        yield self._per_rank(
            GaugeMetricFamily("kvmul_last_score", "Each rank's score in the latest decision", labels=rank),
            st.last_scores,
        )
        yield self._per_rank(
            GaugeMetricFamily("kvmul_mirror_tokens", "Tokens in each rank's cache mirror", labels=rank),
            [m.num_tokens for m in r.mirrors],
        )
        yield self._per_rank(
            GaugeMetricFamily("kvmul_inflight_prompts", "Dispatched prompts not yet confirmed by events", labels=rank),
            [len(p) for p in r.pending],
        )
        yield self._per_rank(
            GaugeMetricFamily("kvmul_stale", "1 while a rank's mirror is untrusted after lost events", labels=rank),
            [int(s) for s in r.stale],
        )
        yield self._per_rank(
            GaugeMetricFamily(
                "kvmul_rank_up", "0 once a rank's scheduler is gone (no more requests go there)", labels=rank
            ),
            [int(not d) for d in r.down],
        )
        dc = r.decode_cost
        for name, value, text in (
            ("decode_steps_measured", dc.steps, "Decode steps SGLang measured, all ranks (decode_moments)"),
            ("decode_slope_us", dc.slope_us, "Measured decode step time per request in the batch, us"),
            ("decode_steps_per_request", dc.steps_per_request, "Measured mean output, in decode steps"),
            ("decode_tokens_per_request", dc.tokens_per_request, "One more request in a batch, in prefill tokens"),
            ("decode_batch_mean", dc.batch_mean, "Measured requests per decode step, all ranks"),
            ("decode_output_tokens", dc.output_tokens, "One output's duration on the clock, in prefill tokens"),
            ("prefill_chunk_tokens", r.chunk_tokens, "The ranks' chunked_prefill_size the rules bound by (0: off)"),
            ("outputs_measured", r.output_spread.finished, "Finished requests with 2+ output tokens, all ranks"),
            ("output_mean", r.output_spread.output_mean, "Their mean output, tokens"),
            ("output_inverse_mean", r.output_spread.inverse_mean, "Their mean 1 / (output - 1)"),
            ("fresh_pause_weight", r.output_spread.fresh_pause_weight, "What pausing a fresh request costs its TPOT"),
        ):
            yield GaugeMetricFamily(f"kvmul_{name}", text, value=value)
        trips = CounterMetricFamily(
            "kvmul_rule_trips",
            "Decisions where a conditional term of the rule ran"
            " (room_priced, room_exempt; timed, speed_spread; shared_stem)",
            labels=["trip"],
        )
        for trip, count in list(getattr(r.rule, "trips", {}).items()):  # a snapshot: the dispatch thread adds
            trips.add_metric([trip], count)
        yield trips
        yield CounterMetricFamily("kvmul_stale_marks", "Times a rank was marked stale", value=st.stale_marks)
        yield self._per_rank(
            CounterMetricFamily(
                "kvmul_orphan_blocks", "Stored blocks whose parent the mirror never saw (missed events)", labels=rank
            ),
            [m.orphan_blocks for m in r.mirrors],
        )
        yield CounterMetricFamily("kvmul_unknown_events", "KV events of an unknown type", value=st.unknown_events)
        yield from self._stream_families()
        for name, value in self.dispatcher.counters().items():
            yield CounterMetricFamily(f"kvmul_{name}", name.replace("_", " "), value=value)

    def _stream_families(self) -> Iterator[CounterMetricFamily]:
        """The event streams' counters, per rank."""
        rank = ["rank"]
        for name, doc, attr in (
            ("kvmul_event_batches", "KV-event batches received live", "batches"),
            ("kvmul_replayed_batches", "KV-event batches fetched from the replay endpoint", "replayed_batches"),
            ("kvmul_duplicate_batches", "KV-event batches dropped as duplicates", "duplicates"),
            ("kvmul_malformed_messages", "KV-event messages dropped as malformed", "malformed"),
            ("kvmul_event_gaps", "Sequence gaps detected", "gaps"),
            ("kvmul_unrecovered_gaps", "Sequence gaps the replay could not fill", "unrecovered_gaps"),
            ("kvmul_publisher_restarts", "KV-event publisher restarts seen", "restarts"),
        ):
            family = CounterMetricFamily(name, doc, labels=rank)
            for s in self.streams:
                family.add_metric([str(s.rank)], getattr(s.stats, attr))
            yield family


def serve(collector: KvmulCollector, port: int, host: str = "127.0.0.1") -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
