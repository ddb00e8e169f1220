"""What in a request would crash a rank, checked before the request reaches one.

SGLang 0.5.23 lets these through to the scheduler, where each takes the whole server down (the
rank raises, the launcher tears everything down): a token id outside the vocabulary (IndexError in
the embedding), an empty prompt in a batch (scheduler RuntimeError), a negative
`logprob_start_len` other than -1 (scheduler AssertionError). The controller sees every request
first, so it answers these with a 400 naming the field instead. min/max run at C speed over the
prompt (the router copies it once anyway).
"""

from __future__ import annotations

from collections.abc import Sequence


class InvalidRequest(ValueError):
    """A request field that no rank can serve; the message names the field."""


def check_request(
    tokens: Sequence[int] | None,
    vocab_size: int | None,
    return_logprob: bool = False,
    logprob_start_len: int | None = -1,
) -> None:
    """Raise InvalidRequest if a rank would fail on this request. `vocab_size` None: not checked."""
    if tokens is None or len(tokens) == 0:
        raise InvalidRequest("input_ids is empty: a prompt needs at least one token")
    try:
        lo, hi = min(tokens), max(tokens)
    except TypeError:
        raise InvalidRequest("input_ids must be integers") from None
    if not isinstance(lo, int) or not isinstance(hi, int):
        raise InvalidRequest("input_ids must be integers")
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        bound = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
        raise InvalidRequest(f"input_ids contains token id {bad}, outside the vocabulary {bound}")
    if return_logprob and logprob_start_len is not None and logprob_start_len < -1:
        raise InvalidRequest(f"logprob_start_len must be -1 or in [0, {len(tokens)}], got {logprob_start_len}")
