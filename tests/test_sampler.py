"""Sampler: greedy/top-k equivalence, seeded reproducibility, the sampled
distribution, filter sets, penalties, logprobs and padding rows.

Every reference here is computed independently in numpy (float64). Each jitted
function is traced once per shape and reused.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from inferflux.engine.sampler import filter_logits, process_logits, sample
from inferflux.engine.sampling_rows import MIN_BIAS_SLOTS, RowParams, SamplingTensors, build_history

_sample = jax.jit(sample, static_argnames="num_logprobs")
_process = jax.jit(process_logits)
_filter = jax.jit(filter_logits)


def run(logits, rows, history=None, *, num_logprobs=0, history_len=8):
    """Sample a batch of len(logits) rows (rows shorter than that are padded)."""
    b = len(logits)
    st = SamplingTensors.from_params(rows, b)
    hist, is_out = build_history(history or [], b, history_len)
    out = _sample(np.asarray(logits, np.float32), st, hist, is_out, num_logprobs=num_logprobs)
    return jax.device_get(out)


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------
# Greedy and top-k
# ---------------------------------------------------------------------------


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(0)
    b, v = 64, 64
    logits = rng.normal(size=(b, v)).astype(np.float32)
    for i in range(0, b, 4):  # exact ties at the max: argmax picks the lowest id
        j1, j2 = sorted(rng.choice(v, 2, replace=False))
        logits[i, [j1, j2]] = logits[i].max() + 1
    logits[1] = -1.0 - rng.random(v)  # -0.0 and +0.0 tie at the max
    logits[1, 7], logits[1, 3] = 0.0, -0.0
    want = np.argmax(logits, -1)
    assert want[1] == 3

    greedy = run(logits, [RowParams(temperature=0.0)] * b)
    np.testing.assert_array_equal(greedy.token_ids, want)
    for step in range(3):
        rows = [RowParams(temperature=1.0, top_k=1, seed=i, step=step) for i in range(b)]
        np.testing.assert_array_equal(run(logits, rows).token_ids, want)


# ---------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------


def test_seed_reproducible_across_batch_composition_and_row():
    rng = np.random.default_rng(1)
    v = 64
    target_logits = (0.3 * rng.normal(size=v)).astype(np.float32)  # flat: many tokens likely
    neighbours = [
        RowParams(temperature=0.0),
        RowParams(temperature=0.8, top_k=5, seed=11),
        RowParams(temperature=1.2, top_p=0.7, seed=12),
        RowParams(min_p=0.2, seed=13),
        RowParams(presence_penalty=0.5, repetition_penalty=1.2, seed=14, logit_bias={3: 5.0}),
        None,  # row 5: the target
        None,  # padding
        RowParams(temperature=0.5, top_k=40, top_p=0.9, seed=15),
    ]
    batch8 = rng.normal(size=(8, v)).astype(np.float32)
    batch8[5] = target_logits
    history = [([1, 2], [3, 4])] * 5
    for target in (RowParams(temperature=1.0, seed=1234), RowParams(temperature=0.9, top_p=0.95, seed=99)):
        alone, shared = [], []
        for step in range(16):
            row = dataclasses.replace(target, step=step)
            out1 = run(target_logits[None], [row])
            rows8 = list(neighbours)
            rows8[5] = row
            out8 = run(batch8, rows8, history, num_logprobs=5)
            assert out1.token_ids[0] == out8.token_ids[5]
            assert out1.logprob[0] == out8.logprob[5]
            alone.append(int(out1.token_ids[0]))
            shared.append(int(out8.token_ids[5]))
        assert alone == shared
        assert len(set(alone)) > 4  # the step is folded in: fresh noise per step

    def tokens(seed):
        return [int(run(target_logits[None], [RowParams(seed=seed, step=s)]).token_ids[0]) for s in range(16)]

    assert tokens(1234) == tokens(1234)
    assert tokens(1234) != tokens(1235)


def test_seed_folding():
    st = SamplingTensors.from_params([RowParams(seed=5), RowParams(seed=2**32 + 5), RowParams(seed=-1)], 3)
    assert st.seed.dtype == np.uint32
    assert st.seed[0] == 5
    assert st.seed[1] != 5  # high bits are not dropped
    assert st.seed[2] != 0  # -1 does not collide with 0
    unseeded = [SamplingTensors.from_params([RowParams()], 1).seed[0] for _ in range(4)]
    assert len(set(unseeded)) > 1  # seed=None draws a fresh seed


# ---------------------------------------------------------------------------
# Distribution
# ---------------------------------------------------------------------------


def test_temperature_sampling_matches_softmax():
    logits = np.linspace(-1.5, 1.5, 12).astype(np.float32)[np.random.default_rng(2).permutation(12)]
    t, draws = 0.7, 2000
    rows = [RowParams(temperature=t, seed=7, step=s) for s in range(draws)]
    out = run(np.tile(logits, (2048, 1)), rows)  # 48 padding rows
    counts = np.bincount(out.token_ids[:draws], minlength=12)
    assert stats.chisquare(counts, draws * np_softmax(logits / t)).pvalue > 1e-3
    # The test has the power to notice a wrong temperature.
    assert stats.chisquare(counts, draws * np_softmax(logits)).pvalue < 1e-3


# ---------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------


def np_allowed(logits, t, k, p, min_p):
    """Reference filter set: descending order with ties by id, float64."""
    x = np.asarray(logits, np.float64) / t
    v = len(x)
    order = np.lexsort((np.arange(v), -x))
    keep = np.ones(v, bool)
    if 0 < k < v:
        keep[order[k:]] = False
    if p < 1:
        probs = np_softmax(np.where(keep, x, -np.inf))[order]
        before = np.cumsum(probs) - probs
        keep[order[before >= p]] = False
    if min_p > 0:
        probs = np_softmax(np.where(keep, x, -np.inf))
        keep &= probs >= min_p * probs.max()
    return keep


def _filter_case(rng, kind, logits, t):
    """A (top_k, top_p, min_p) for `kind`, each threshold well away from a boundary."""
    x = logits.astype(np.float64) / t
    k, p, min_p = 0, 1.0, 0.0
    if kind in ("top_k", "all"):
        k = int(rng.integers(1, 20))
    if kind in ("top_p", "all"):
        probs = np.sort(np_softmax(np.where(np_allowed(logits, t, k, 1, 0), x, -np.inf)))[::-1]
        cum = np.cumsum(probs)
        i = int(rng.integers(0, max(1, np.searchsorted(cum, 0.99))))
        p = float((cum[i] + cum[i + 1]) / 2)
        assert np.abs(cum - p).min() > 1e-4
    if kind in ("min_p", "all"):
        probs = np_softmax(np.where(np_allowed(logits, t, k, p, 0), x, -np.inf))
        ratios = np.sort(probs[probs > 0] / probs.max())[::-1]
        i = int(rng.integers(0, len(ratios) - 1)) if len(ratios) > 1 else 0
        min_p = float((ratios[i] + ratios[min(i + 1, len(ratios) - 1)]) / 2) if len(ratios) > 1 else 0.5
        assert np.abs(probs[probs > 0] / probs.max() - min_p).min() > 1e-5
    return k, p, min_p


def test_top_k_top_p_min_p_stay_in_allowed_set():
    rng = np.random.default_rng(3)
    v, vectors, draws = 64, 16, 128
    kinds = ["top_k", "top_p", "min_p", "all"]
    cases = []
    for j in range(vectors):
        logits = (rng.normal(size=v) * rng.uniform(0.5, 2.5)).astype(np.float32)
        t = float(rng.uniform(0.5, 1.5))
        k, p, min_p = _filter_case(rng, kinds[j % 4], logits, t)
        cases.append((logits, RowParams(temperature=t, top_k=k, top_p=p, min_p=min_p, seed=j),
                      np_allowed(logits, t, k, p, min_p)))

    # The filter mask itself equals the reference, token for token.
    logits = np.stack([c[0] for c in cases])
    st = SamplingTensors.from_params([c[1] for c in cases], vectors)
    filtered = np.asarray(_filter(logits, st))
    for j, (_, _, allowed) in enumerate(cases):
        np.testing.assert_array_equal(np.isfinite(filtered[j]), allowed, err_msg=f"case {j} ({kinds[j % 4]})")
        assert 1 <= allowed.sum() < v

    # And no draw ever leaves it.
    rows = [dataclasses.replace(c[1], step=s) for c in cases for s in range(draws)]
    out = run(np.repeat(logits, draws, axis=0), rows)
    for j, (row_logits, params, allowed) in enumerate(cases):
        got = out.token_ids[j * draws:(j + 1) * draws]
        assert allowed[got].all(), f"case {j} ({kinds[j % 4]}) sampled outside its allowed set"
        # Not over-filtered either: every allowed token with >= 10% renormalised mass shows up.
        probs = np_softmax(np.where(allowed, row_logits / params.temperature, -np.inf))
        assert set(np.flatnonzero(probs >= 0.1)) <= set(got.tolist()), f"case {j}"


def test_top_p_keeps_crossing_token_and_ties_by_id():
    # probs 0.5, 0.25, 0.125, 0.125 (ids 3, 0, 1, 2): top_p=0.6 keeps {3, 0}; 0.8 adds id 1, not its tie id 2.
    logits = np.log(np.array([[0.25, 0.125, 0.125, 0.5]] * 3, np.float32))
    rows = [RowParams(top_p=0.6), RowParams(top_p=0.8), RowParams(top_k=3)]
    st = SamplingTensors.from_params(rows, 3)
    kept = np.isfinite(np.asarray(_filter(logits, st)))
    np.testing.assert_array_equal(kept, [[1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1]])


# ---------------------------------------------------------------------------
# Penalties and logit bias
# ---------------------------------------------------------------------------


def np_process(logits, params, history):
    x = np.asarray(logits, np.float32).astype(np.float64).copy()
    for i, (row, hist) in enumerate(zip(params, history)):
        for tok, val in (row.logit_bias or {}).items():
            x[i, tok] += val
        prompt, output = hist
        seen = sorted(set(prompt) | set(output))
        rep = row.repetition_penalty
        x[i, seen] = np.where(x[i, seen] > 0, x[i, seen] / rep, x[i, seen] * rep)
        counts = np.bincount(np.asarray(output, int), minlength=x.shape[1]).astype(np.float64)
        x[i] -= row.presence_penalty * (counts > 0) + row.frequency_penalty * counts
    return x


def test_process_logits_matches_formulas():
    rng = np.random.default_rng(4)
    b, v, h = 8, 64, 32
    logits = (2 * rng.normal(size=(b, v))).astype(np.float32)
    params, history = [], []
    for i in range(b):
        params.append(RowParams(
            presence_penalty=float(rng.uniform(-1, 2)) if i % 2 else 0.0,
            frequency_penalty=float(rng.uniform(-1, 2)) if i % 3 else 0.0,
            repetition_penalty=float(rng.uniform(0.5, 2.0)) if i != 4 else 1.0,
            logit_bias={int(t): float(rng.uniform(-5, 5)) for t in rng.choice(v, 3, replace=False)},
        ))
        n_prompt, n_out = rng.integers(0, 12, size=2)
        history.append((rng.integers(0, 16, n_prompt).tolist(), rng.integers(8, 24, n_out).tolist()))
    st = SamplingTensors.from_params(params, b)
    hist, is_out = build_history(history, b, h)
    got = np.asarray(_process(logits, st, hist, is_out))
    np.testing.assert_allclose(got, np_process(logits, params, history), rtol=1e-6, atol=1e-5)


def test_penalties_and_bias_flip_greedy_choice():
    v = 64
    base = np.full(v, -3.0, np.float32)
    base[0], base[1] = 2.0, 1.9
    neg = np.full(v, -3.0, np.float32)
    neg[0], neg[1] = -1.0, -1.05
    g = 0.0  # greedy
    cases = [  # (logits, params, (prompt, output), expected greedy token)
        (base, RowParams(temperature=g), ([], [0]), 0),
        (base, RowParams(temperature=g, presence_penalty=0.2), ([], [0]), 1),
        (base, RowParams(temperature=g, presence_penalty=0.05), ([], [0]), 0),
        (base, RowParams(temperature=g, presence_penalty=1.0), ([0, 0], []), 0),  # prompt does not count
        (base, RowParams(temperature=g, frequency_penalty=0.04), ([], [0, 0, 0]), 1),
        (base, RowParams(temperature=g, frequency_penalty=0.03), ([], [0, 0, 0]), 0),
        (base, RowParams(temperature=g, frequency_penalty=0.2), ([0], [5]), 0),  # prompt does not count
        (base, RowParams(temperature=g, repetition_penalty=1.1), ([0], []), 1),  # prompt counts
        (base, RowParams(temperature=g, repetition_penalty=1.1), ([], [0]), 1),
        (base, RowParams(temperature=g, repetition_penalty=1.04), ([0], []), 0),
        (neg, RowParams(temperature=g, repetition_penalty=1.1), ([0], []), 1),  # negative: multiplied
        (neg, RowParams(temperature=g, repetition_penalty=0.9), ([1], []), 1),  # < 1 rewards
        (base, RowParams(temperature=g, logit_bias={0: -np.inf}), ([], []), 1),
        (base, RowParams(temperature=g, logit_bias={0: -100.0}), ([], []), 1),
        (base, RowParams(temperature=g, logit_bias={6: 100.0}), ([], []), 6),
        (base, RowParams(temperature=g, logit_bias={1: 0.2}), ([], []), 1),
    ]
    logits = np.stack([c[0] for c in cases])
    out = run(logits, [c[1] for c in cases], [c[2] for c in cases])
    np.testing.assert_array_equal(out.token_ids, [c[3] for c in cases])


def test_logit_bias_forces_and_bans_when_sampling():
    rng = np.random.default_rng(5)
    b, v = 64, 64
    logits = rng.normal(size=(b, v)).astype(np.float32)
    forced = run(logits, [RowParams(temperature=1.5, seed=i, logit_bias={17: 100.0}) for i in range(b)])
    assert (forced.token_ids == 17).all()
    flat = np.zeros((b, v), np.float32)
    flat[:, 32:] = -30.0  # sampling stays within 0..31
    banned = {t: -np.inf for t in range(0, 30, 2)} | {1: -100.0}  # 16 entries: 0, 1, 2, 4, ..., 28
    out = run(flat, [RowParams(temperature=1.0, seed=i, logit_bias=banned) for i in range(b)])
    assert not np.isin(out.token_ids, list(banned)).any()
    assert len(set(out.token_ids.tolist())) > 10


# ---------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_logprobs", [0, 5])
def test_logprobs_are_raw_log_softmax(num_logprobs):
    rng = np.random.default_rng(6)
    b, v = 8, 64
    logits = (3 * rng.normal(size=(b, v))).astype(np.float32)
    rows = [
        RowParams(temperature=0.0),
        RowParams(temperature=0.3, seed=1, top_logprobs=num_logprobs),  # one row asking: every row gets them
        RowParams(temperature=2.0, seed=2, top_k=50),
        RowParams(presence_penalty=1.5, repetition_penalty=1.3, seed=3),
        RowParams(temperature=0.0, logit_bias={int(np.argmin(logits[4])): 1000.0}),  # far outside top-N
        RowParams(top_p=0.5, min_p=0.1, seed=4),
        RowParams(temperature=1.0, logit_bias={int(np.argmax(logits[6])): -np.inf}, seed=5),
        None,
    ]
    history = [([1, 2, 3], [4, 5])] * 7
    out = run(logits, rows, history, num_logprobs=num_logprobs)
    ref = np_log_softmax(logits)
    assert out.top_ids.shape == (b, num_logprobs) and out.top_logprobs.shape == (b, num_logprobs)
    if num_logprobs:
        want_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :num_logprobs]
        np.testing.assert_array_equal(out.top_ids, want_ids)
        np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, want_ids, -1), atol=1e-5)
    np.testing.assert_allclose(out.logprob, ref[np.arange(b), out.token_ids], atol=1e-5)
    assert out.token_ids[4] == np.argmin(logits[4])
    assert out.token_ids[6] != np.argmax(logits[6])


def test_top_logprobs_are_skipped_when_no_row_asks():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    rows = [RowParams(temperature=0.0), RowParams(temperature=0.7, seed=3), None]
    skipped = run(logits, rows, num_logprobs=3)
    asked = run(logits, rows[:1] + [RowParams(temperature=0.7, seed=3, top_logprobs=2)] + rows[2:], num_logprobs=3)
    assert not skipped.top_ids.any() and np.isneginf(skipped.top_logprobs).all()
    np.testing.assert_array_equal(asked.top_ids, np.argsort(-logits, axis=-1, kind="stable")[:, :3])
    # The sampled tokens and their logprobs do not depend on it.
    np.testing.assert_array_equal(skipped.token_ids, asked.token_ids)
    np.testing.assert_array_equal(skipped.logprob, asked.logprob)


def test_row_params_carry_the_requests_logprobs():
    from inferflux.engine.sampling_params import SamplingParams

    assert RowParams.from_sampling_params(SamplingParams(logprobs=4), step=0).top_logprobs == 4
    assert RowParams.from_sampling_params(SamplingParams(logprobs=None), step=0).top_logprobs == 0


# ---------------------------------------------------------------------------
# Padding rows
# ---------------------------------------------------------------------------


def test_padding_rows_are_harmless():
    rng = np.random.default_rng(7)
    v = 64
    real = (2 * rng.normal(size=(3, v))).astype(np.float32)
    rows = [
        RowParams(temperature=0.8, top_p=0.9, seed=1, step=3),
        RowParams(temperature=0.0, repetition_penalty=1.3),
        RowParams(temperature=1.1, top_k=10, min_p=0.05, presence_penalty=0.7, seed=2, step=9),
    ]
    history = [([1, 2], [3]), ([4, 5, 6], [7, 7]), ([], [8, 9, 9])]
    junk = np.stack([
        np.full(v, np.nan), np.full(v, -np.inf), np.full(v, np.inf),
        np.where(rng.random(v) < 0.5, np.nan, 1e38), rng.normal(size=v) * 1e30,
    ]).astype(np.float32)

    alone = run(real, rows, history, num_logprobs=5)
    padded = run(np.concatenate([real, junk]), rows, history, num_logprobs=5)
    for out in (alone, padded):
        for leaf in (out.logprob, out.top_logprobs):
            assert not np.isnan(leaf).any()
        assert ((out.token_ids >= 0) & (out.token_ids < v)).all()
    for name in ("token_ids", "logprob", "top_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(padded, name)[:3], getattr(alone, name), err_msg=name)


# ---------------------------------------------------------------------------
# Host-side packing
# ---------------------------------------------------------------------------


def test_from_params_packs_and_validates():
    st = SamplingTensors.from_params([RowParams(logit_bias={"5": 1.0, 9: -2.0}), None], 4)
    assert st.temperature.tolist() == [1.0, 0.0, 0.0, 0.0]  # padding rows are greedy
    assert st.bias_ids.shape == (4, MIN_BIAS_SLOTS)
    assert st.bias_ids[0, :3].tolist() == [5, 9, -1] and (st.bias_ids[1:] == -1).all()
    wide = SamplingTensors.from_params([RowParams(logit_bias={i: 1.0 for i in range(17)})], 1)
    assert wide.bias_ids.shape == (1, 32)
    bad_values = [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                  ("repetition_penalty", 0.0), ("logit_bias", {-1: 1.0}), ("presence_penalty", np.nan)]
    for name, value in bad_values:
        with pytest.raises(ValueError, match=name):
            SamplingTensors.from_params([RowParams(**{name: value})], 1)
    with pytest.raises(ValueError):
        SamplingTensors.from_params([RowParams(logit_bias={10: 1.0})], 1, vocab_size=10)
    with pytest.raises(ValueError):
        build_history([([1] * 5, [2] * 4)], 1, 8)
