"""Token sampling inside the compiled step.

The model runner's jitted step ends with :func:`sample`, so only the sampled
ids (and the logprobs a request asked for) leave the device. Everything here
is pure ``jax.numpy`` on static shapes: ``B`` rows (a bucketed batch size,
padding rows included) by ``V`` vocabulary entries.

Host side, once per step::

    st = SamplingTensors.from_params(row_params, batch_size)       # numpy (sampling_rows.py)
    history, is_output = build_history(row_tokens, batch_size, H)  # numpy (sampling_rows.py)

Device side, inside the step function::

    out = sample(logits, st, history, is_output, num_logprobs=n)

Processing order (per row; every stage is a no-op at its default):

0. **grammar mask** -- tokens whose bit is clear in ``allowed`` (packed int32
   ``[B, ceil(V/32)]``, engine/grammar.py) become -inf; skipped when every
   bit is set (no constrained row in the step).
1. **logit bias** -- ``logit[id] += bias`` (sparse, ``bias_ids`` / ``bias_values``).
2. **repetition penalty** (HF / vLLM) -- for each token in the prompt *or* the
   generated output: ``logit / p`` if ``logit > 0`` else ``logit * p``.
3. **presence / frequency penalties** (OpenAI) -- for tokens *generated* in this
   request: ``logit -= presence * (count > 0) + frequency * count``.
4. **greedy rows** (``temperature < GREEDY_EPS``) take ``argmax`` of the logits
   so far (ties -> lowest id) and skip the rest. Other rows:
5. **temperature** -- ``logit / T``.
6. **top-k** -- keep the ``k`` highest logits (ties broken by lowest id, so
   ``top_k=1`` picks exactly the greedy token).
7. **top-p** -- on the distribution left by top-k (renormalised), keep the
   smallest set of top tokens whose cumulative probability reaches ``top_p``,
   including the token that crosses it.
8. **min-p** -- drop tokens with ``prob < min_p * max_prob``.
9. **sample** -- Gumbel-max with a per-row key
   ``fold_in(key(seed), step)``, so a request with a given seed draws the same
   tokens whatever else shares its batch and whichever row it occupies.

Filtering never removes the top-1 token, so every row always has a candidate.
Top-k and top-p run only when some sampling row asks for them (``lax.cond`` on
a traced flag), and an all-greedy batch skips filtering and the random draw
altogether. They find each row's cut-off by bisection on the float ordering
(32 passes over the row) instead of sorting the vocabulary: on the 2-core
XLA:CPU dev box a sort of a [64, 128k] batch took ~2.8 s, the bisection
~0.13 s, for the same kept set (ties at the cut-off resolved by lowest id, as
a stable descending sort would). Rows that do not filter pass through those branches bit-for-bit, so a
row's result does not depend on which branches its neighbours triggered.

Logprobs are ``log_softmax`` of the **raw** model logits, before bias,
penalties, temperature and filtering (vLLM v1's default ``raw_logprobs``
mode): they describe the model, not the sampler's settings. The sampled
token's logprob is always reported, even when it is not among the top-N.

Padding rows (``None`` in :meth:`SamplingTensors.from_params`, ``-1`` history)
are greedy with no penalties, so they never trigger a filter branch; NaN or
inf logits in any row are sanitised (NaN -> -inf, +inf -> float32 max), so
nothing returns NaN and rows never interact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from inferflux.engine.sampling_rows import GREEDY_EPS, SampleOutput, SamplingTensors

_F32_MAX = float(np.finfo(np.float32).max)

__all__ = ["filter_logits", "process_logits", "sample", "token_logprobs"]

# ---------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------


def _sanitize(x: jax.Array) -> jax.Array:
    """NaN -> -inf and +inf -> float32 max, so softmax-like math never sees
    ``inf - inf``; -inf (a banned token) stays."""
    return jnp.minimum(jnp.where(jnp.isnan(x), -jnp.inf, x), _F32_MAX)


def _argmax(x: jax.Array) -> jax.Array:
    """Row argmax ``[B]`` int32, ties -> lowest id (``jnp.argmax`` on NaN-free rows), as a max then a min-reduce.

    XLA:CPU lowers ``jnp.argmax``'s variadic (value, index) reduction to a slow scalar loop: 1.4 ms for a
    [8, 32000] batch on the 2-core dev box, against 0.25 ms for these two plain reductions. (A NaN row, which
    sanitised logits never have, gives the last id instead of the NaN's.)
    """
    v = x.shape[-1]
    ids = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), ids, v), axis=-1)
    return jnp.minimum(first, v - 1)


def _row_max(x: jax.Array) -> jax.Array:
    """Row max as ``[B, 1]``, 0 for rows that are all -inf."""
    m = jnp.max(x, axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _softmax(x: jax.Array) -> jax.Array:
    """Softmax of sanitised logits; an all -inf row gives all zeros."""
    e = jnp.exp(x - _row_max(x))
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def _log_normalizer(x: jax.Array) -> jax.Array:
    """``[B, 1]`` logsumexp of sanitised logits, 0 for an all -inf row (whose
    logprobs then come out -inf rather than NaN)."""
    m = _row_max(x)
    s = jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)
    return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), 0.0)


def _apply_bias(x, st: SamplingTensors):
    b, v = x.shape
    ids = st.bias_ids
    ok = (ids >= 0) & (ids < v)
    x = x.at[jnp.arange(b)[:, None], jnp.where(ok, ids, v)].add(
        jnp.where(ok, st.bias_values, 0.0), mode="drop"
    )
    return _sanitize(x)


def _apply_penalties(x, st: SamplingTensors, history, history_is_output):
    b, v = x.shape
    rows = jnp.arange(b)[:, None]
    valid = (history >= 0) & (history < v)
    idx = jnp.where(valid, history, v)  # out of range -> dropped
    counts = jnp.zeros((b, v), jnp.float32).at[rows, idx].add(
        (valid & history_is_output).astype(jnp.float32), mode="drop"
    )
    seen = jnp.zeros((b, v), bool).at[rows, idx].set(True, mode="drop")
    rep = st.repetition_penalty[:, None]
    y = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    y = y - st.presence_penalty[:, None] * (counts > 0) - st.frequency_penalty[:, None] * counts
    # Rows without penalties come through bit for bit (see module doc).
    return _sanitize(jnp.where(_has_penalty(st)[:, None], y, x))


def _has_penalty(st: SamplingTensors) -> jax.Array:
    return (st.repetition_penalty != 1) | (st.presence_penalty != 0) | (st.frequency_penalty != 0)


def process_logits(
    logits: jax.Array,
    st: SamplingTensors,
    history: jax.Array,
    history_is_output: jax.Array,
) -> jax.Array:
    """Stages 1-3: logit bias, repetition penalty, presence/frequency.

    ``logits`` f32 [B, V]; ``history`` i32 [B, H] (prompt + generated ids, -1
    padded, H may be 0) with ``history_is_output`` bool [B, H] marking the
    generated ones. Returns the f32 [B, V] logits greedy rows take the argmax
    of. The bias and penalty scatters run only when some row uses them.
    """
    return _process(_sanitize(logits.astype(jnp.float32)), st, history, history_is_output)


def _apply_mask(x: jax.Array, allowed: jax.Array) -> jax.Array:
    """-inf where the row's grammar forbids the token (bit ``t % 32`` of word ``t // 32`` clear)."""
    v = x.shape[-1]
    ids = jnp.arange(v, dtype=jnp.int32)
    words = jnp.take(allowed.astype(jnp.int32), ids // 32, axis=1)
    bit = lax.shift_right_logical(words, (ids % 32)[None, :]) & 1
    return jnp.where(bit == 1, x, -jnp.inf)


def _process(x, st: SamplingTensors, history, history_is_output):
    """:func:`process_logits` on already sanitised logits."""
    if st.allowed is not None:
        x = lax.cond(jnp.any(st.allowed != -1), _apply_mask, lambda x, _: x, x, st.allowed)
    x = lax.cond(jnp.any(st.bias_ids >= 0), _apply_bias, lambda x, _: x, x, st)
    return lax.cond(
        jnp.any(_has_penalty(st)),
        _apply_penalties,
        lambda x, *_: x,
        x,
        st,
        history.astype(jnp.int32),
        history_is_output.astype(bool),
    )


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 key with the same order as the float32 values (-0.0 == +0.0)."""
    x = jnp.where(x == 0, 0.0, x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _keep_top(x: jax.Array, weight: jax.Array, budget: jax.Array) -> jax.Array:
    """Keep mask [B, V] equal to walking each row in descending ``x`` order
    (ties: lowest id first) and keeping every token whose preceding weight
    total is still below ``budget`` [B] -- i.e. the shortest prefix whose
    weight reaches the budget. Weight 1 is top-k, probabilities are top-p.

    No sort: bisection over the 2**32 float keys finds the key ``t`` of the
    last kept token (the largest ``t`` with ``sum(weight[key >= t]) >= budget``),
    then ties at ``t`` are kept in id order.
    """
    key = _order_key(x)

    def step(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi] (lo when no key reaches the budget)
        mid = lo + (hi - lo + 1) // 2
        ok = jnp.sum(jnp.where(key >= mid[:, None], weight, 0.0), axis=-1) >= budget
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, jnp.where(mid > lo, mid - 1, hi))

    t, _ = lax.fori_loop(0, 32, step, (jnp.min(key, axis=-1), jnp.max(key, axis=-1)))
    t = t[:, None]
    above = key > t
    before_ties = jnp.sum(jnp.where(above, weight, 0.0), axis=-1, keepdims=True)
    tie_w = jnp.where(key == t, weight, 0.0)
    keep = above | ((key == t) & (before_ties + (jnp.cumsum(tie_w, axis=-1) - tie_w) < budget[:, None]))
    # The top-1 token always survives, whatever rounding did.
    return keep | (jnp.arange(x.shape[-1]) == _argmax(x)[:, None])


def _top_k(x, k, on):
    keep = _keep_top(x, jnp.ones_like(x), k.astype(jnp.float32))
    return jnp.where(keep | ~on[:, None], x, -jnp.inf)


def _top_p(x, p, on):
    keep = _keep_top(x, _softmax(x), p)
    return jnp.where(keep | ~on[:, None], x, -jnp.inf)


def filter_logits(x: jax.Array, st: SamplingTensors) -> jax.Array:
    """Stages 5-8 on processed logits: temperature, top-k, top-p, min-p.

    Returns f32 [B, V] logits to sample from (filtered tokens are -inf).
    Greedy rows come back unscaled and unfiltered (:func:`sample` takes their
    argmax before this stage).
    """
    v = x.shape[-1]
    sampling = st.temperature >= GREEDY_EPS
    x = _sanitize(x / jnp.where(sampling, st.temperature, 1.0)[:, None])
    topk_on = sampling & (st.top_k > 0) & (st.top_k < v)
    x = lax.cond(jnp.any(topk_on), _top_k, lambda x, *_: x, x, st.top_k, topk_on)
    topp_on = sampling & (st.top_p < 1)
    x = lax.cond(jnp.any(topp_on), _top_p, lambda x, *_: x, x, st.top_p, topp_on)
    # min-p: p_i < min_p * p_max  <=>  exp(x_i - x_max) < min_p (normalisation cancels).
    minp_on = sampling & (st.min_p > 0)
    drop = minp_on[:, None] & (jnp.exp(x - _row_max(x)) < st.min_p[:, None])
    return jnp.where(drop, -jnp.inf, x)


def _row_gumbel(seed: jax.Array, step: jax.Array, v: int) -> jax.Array:
    """Gumbel noise [B, V]; row i depends only on (seed[i], step[i])."""

    def one(s, t):
        return jax.random.gumbel(jax.random.fold_in(jax.random.key(s), t), (v,), jnp.float32)

    return jax.vmap(one)(seed, step)


def sample(
    logits: jax.Array,
    st: SamplingTensors,
    history: jax.Array,
    history_is_output: jax.Array,
    *,
    num_logprobs: int,
) -> SampleOutput:
    """Sample one token per row; see the module doc for the order of stages.

    ``logits`` f32 [B, V] raw model logits; ``st`` from
    :meth:`SamplingTensors.from_params`; ``history`` / ``history_is_output``
    from :func:`build_history`. ``num_logprobs`` (static, may be 0) is the
    number of top logprobs returned per row. Logprobs are log_softmax of the
    raw logits (before bias, penalties, temperature, filters), as in vLLM v1's
    default. Jit with ``static_argnames="num_logprobs"``; do not vmap (the
    ``lax.cond`` skips would turn into selects that run every branch).
    """
    raw = _sanitize(logits.astype(jnp.float32))
    b, v = raw.shape
    x = _process(raw, st, history, history_is_output)
    greedy_ids = _argmax(x)
    sampling = st.temperature >= GREEDY_EPS

    def draw(x):
        y = filter_logits(x, st) + _row_gumbel(st.seed, st.step, v)
        return jnp.where(sampling, _argmax(y), greedy_ids)

    token_ids = lax.cond(jnp.any(sampling), draw, lambda _: greedy_ids, x)
    return token_logprobs(raw, token_ids, num_logprobs=num_logprobs, wanted=jnp.any(st.top_logprobs > 0))


def token_logprobs(logits: jax.Array, token_ids: jax.Array, *, num_logprobs: int,
                   wanted: jax.Array | None = None) -> SampleOutput:
    """Logprobs of `token_ids` under the raw `logits` [B, V], and each row's top `num_logprobs`.

    The one definition of a logprob, shared by sampled tokens and scored prompt tokens
    (prompt_logprobs), so the two always agree. A negative id (no target) gets a meaningless value.
    `wanted` (a traced bool) false skips the top-N (a `lax.cond`): ids 0 and logprobs -inf come back, for
    steps in which no row asked for them (~0.1-0.6 ms of XLA:CPU's top_k at [1-8, 32000], k=20).
    """
    raw = _sanitize(logits.astype(jnp.float32))
    b = raw.shape[0]
    lse = _log_normalizer(raw)
    safe_ids = jnp.maximum(token_ids, 0).astype(jnp.int32)
    logprob = jnp.take_along_axis(raw, safe_ids[:, None], axis=-1)[:, 0] - lse[:, 0]
    if num_logprobs > 0:
        def top(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
            top_vals, top_ids = lax.top_k(raw, num_logprobs)  # ties -> lowest id first
            return top_ids.astype(jnp.int32), top_vals - lse

        def skip(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
            return jnp.zeros((b, num_logprobs), jnp.int32), jnp.full((b, num_logprobs), -jnp.inf, jnp.float32)

        top_ids, top_logprobs = top(raw) if wanted is None else lax.cond(wanted, top, skip, raw)
    else:
        top_ids = jnp.zeros((b, 0), jnp.int32)
        top_logprobs = jnp.zeros((b, 0), jnp.float32)
    return SampleOutput(
        token_ids=token_ids.astype(jnp.int32),
        logprob=logprob,
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_logprobs,
    )
