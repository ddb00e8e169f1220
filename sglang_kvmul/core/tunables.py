"""The core's few named constants, each with why it has its value. None is a scoring weight: they
are detector thresholds and bookkeeping bounds, the same for every workload.

The serving layer's knobs (poll period, event slices, session table) live in `serving.settings`.
"""

# load_ledger: an idle scheduler picks up a request within this long of its dispatch, so on an idle
# snapshot only what was sent in this window can still be queued (bounds drift from mispredictions).
RECV_SLACK_S = 0.01
# load_ledger: prefilled tokens before a rank's measured prefill speed is trusted (a few chunks).
MIN_TOKENS_FOR_SPEED = 16384
# decode_cost: decode steps (pooled over ranks) before the step time's slope on batch size is used.
MIN_DECODE_STEPS_FOR_SLOPE = 256
# guard (prefill speeds) and decode_cost (decode and prefill speeds where they agree, read by
# marginal_timed): measured speeds closer than this ratio are noise, not a speed spread.
SPEED_SPREAD = 1.25
# decode_cost: finished requests (pooled over ranks) before their outputs' spread is used to weigh a
# pause on a request that has not decoded yet (`fresh_pause_weight`): a few dozen outputs.
MIN_FINISHED_FOR_SPREAD = 32
# pending: an in-flight prompt not confirmed by events or the prefill counter by then is dropped;
# at most this many per rank are credited (a burst beyond it is scored on the mirror alone).
PENDING_TTL_S = 30.0
PENDING_MAX_ENTRIES = 256
