"""Micro-benchmark of the partitioner: one expert of a Qwen3-30B-A3B-like shape (768 neurons, G=8).

Synthetic co-activation (neurons in latent clusters that fire together) stands in for calibration.
CI runs it with --benchmark-disable (one pass, as a smoke test); run
`python -m pytest tests/test_bench_refactor.py --benchmark-enable` to time it.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeprism.refactor.partition import NeuronStats, balanced_kmeans, partition

INTER = 768
GROUPS = 8
ITERS = 2000


@pytest.fixture(scope="module")
def stats() -> NeuronStats:
    rng = np.random.default_rng(0)
    member = rng.integers(0, 32, INTER)
    c = rng.random((1024, 32))[:, member] ** 4 + 0.05 * rng.random((1024, INTER))
    c /= c.sum(1, keepdims=True)
    return NeuronStats(importance=c.mean(0), frequency=(c > c.mean(1, keepdims=True)).mean(0), coact=c.T @ c,
                       tokens=1024)


def test_bench_balanced_kmeans(benchmark, stats):
    labels = benchmark(lambda: balanced_kmeans(stats.coact, GROUPS, np.random.default_rng(0)))
    assert np.bincount(labels, minlength=GROUPS).tolist() == [INTER // GROUPS] * GROUPS


@pytest.mark.parametrize("method", ["anneal", "genetic"])
def test_bench_solver(benchmark, stats, method):
    part = benchmark(lambda: partition(stats, GROUPS, method, seed=0, iters=ITERS))
    assert part.objective > partition(stats, GROUPS, "random", seed=0).objective
