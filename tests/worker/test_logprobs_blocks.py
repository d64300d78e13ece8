"""Top log probabilities are taken a block of positions at a time, so a long sequence with a large
vocabulary (Llama 3's 128,256 tokens) costs the worker no more than the distribution CTranslate2
returns: before, ``argpartition`` over the whole sequence added 12 bytes per position and token
(1.5 GiB for 1,024 positions of that vocabulary)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from worker.logprobs import LogProbs, top_k


def naive(dist: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    out = []
    for row in dist:
        order = sorted(range(len(row)), key=lambda t: (-row[t], t))[:k]
        out.append([(t, float(row[t])) for t in order])
    return out


def test_top_k_by_blocks_equals_a_full_sort(monkeypatch):
    import worker.logprobs as lp

    rng = np.random.default_rng(0)
    dist = rng.standard_normal((37, 50)).astype(np.float32)
    dist[3, :10] = 1.5  # ties: the lower id first
    dist[5] = 0.0
    monkeypatch.setattr(lp, "TOP_K_BLOCK_FLOATS", 50 * 4)  # blocks of 4 positions
    for k in (1, 5, 20, 50):
        got, want = top_k(dist, k), naive(dist, k)
        assert len(got) == len(dist)
        for p, (mine, theirs) in enumerate(zip(got, want, strict=True)):
            # The same values, most likely first; each id holds its value; among equal values the
            # lower id first (which of equal values at the cut-off is listed is not specified).
            assert [v for _, v in mine] == [v for _, v in theirs], (k, p)
            assert all(dist[p, t] == v for t, v in mine) and len({t for t, _ in mine}) == k
            assert mine == sorted(mine, key=lambda tv: (-tv[1], tv[0])), (k, p)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from worker.builder import build_model

    return build_model(tmp_path_factory.mktemp("models") / "wide", preset="tiny-wide", seed=3,
                       context_length=2048)


def test_a_long_sequence_over_a_large_vocabulary_stays_within_bounded_memory(wide_model):
    from core.registry import ModelSpec
    from worker.runner import ModelRunner

    spec = ModelSpec(name="wide", path=str(wide_model), chat=False, context_length=2048)
    runner = ModelRunner(wide_model, spec, inter_threads=1, intra_threads=1)
    logprobs: LogProbs = runner.logprobs
    assert len(logprobs.vocabulary) == 128256
    rng = np.random.default_rng(1)
    ids = [1] + rng.integers(3, 128256, size=1023).tolist()
    tracemalloc.start()
    try:
        [positions] = logprobs.log_probs([(ids, 1, 5)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    distribution = 1023 * 128256 * 4  # what CTranslate2 returns, as float32 (not numpy's: not traced)
    assert peak < 96 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB over a {distribution / 2**20:.0f} MiB distribution"
    assert len(positions.top) == 1023 and all(len(t) == 5 for t in positions.top)
    # The same answer as the whole sequence at once, for a few positions.
    full = logprobs._numpy(logprobs.generator.forward_batch([ids], return_log_probs=True))[0]
    for p in (0, 511, 1022):
        assert positions.top[p] == naive(full[p:p + 1], 5)[0]
        assert positions.logprobs[p] == pytest.approx(float(full[p, ids[p + 1]]))
