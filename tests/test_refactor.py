"""The offline refactoring engine and the `keep` knob.

Partitions are permutations with balanced groups; the solvers beat `random` on their objective
within a small budget and are deterministic under a seed; a refactored model at full quality gives
the original's logits (every family, up to fp32 summation order) and greedy tokens; `keep` < 1
skips units on every execution path with the same outputs whatever the cache; bad input fails with
a typed error and leaves no artifact behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VARIANTS

import edgeprism
from edgeprism.errors import (
    ArtifactError,
    ConfigError,
    InputError,
    OutputError,
    UnsupportedModelError,
)
from edgeprism.refactor import artifact
from edgeprism.refactor.partition import METHODS, NeuronStats, partition
from edgeprism.refactor.run import RefactorOptions, refactor

MODEL = edgeprism.DEFAULT_MODEL
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]
SMALL = RefactorOptions(groups=8, iters=300, calib_tokens=512)  # seconds, not minutes


def clustered_stats(inter: int = 96, tokens: int = 600, clusters: int = 12, seed: int = 0) -> NeuronStats:
    """Neurons in latent clusters that fire together: a grouping problem with a known good answer."""
    rng = np.random.default_rng(seed)
    member = rng.integers(0, clusters, inter)
    c = rng.random((tokens, clusters))[:, member] ** 4 + 0.05 * rng.random((tokens, inter))
    c /= c.sum(1, keepdims=True)
    return NeuronStats(importance=c.mean(0), frequency=(c > c.mean(1, keepdims=True)).mean(0), coact=c.T @ c,
                       tokens=tokens)


@pytest.fixture(scope="module")
def stats() -> NeuronStats:
    return clustered_stats()


@pytest.fixture(scope="module")
def refactored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return refactor(MODEL, tmp_path_factory.mktemp("art") / "anneal-g8", SMALL)


@pytest.fixture(scope="module")
def engines(refactored: Path) -> tuple[edgeprism.Engine, edgeprism.Engine]:
    return (edgeprism.load(device="cpu", dtype="fp32", groups=8),
            edgeprism.load(refactored, device="cpu", dtype="fp32"))


# ---- partition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixed", [(False, False), (True, True)])
def test_partition_is_a_balanced_permutation(stats, method, fixed):
    p = partition(stats, 8, method, seed=3, iters=200, always_on=fixed[0], dropped=fixed[1])
    assert sorted(p.perm.tolist()) == list(range(96))  # a permutation: every neuron exactly once
    assert p.perm.shape == (96,) and p.importance.shape == (8,)  # 8 groups of 12 by construction
    solved = p.importance[int(fixed[0]):8 - int(fixed[1])]
    assert np.all(np.diff(solved) <= 1e-12)  # solver groups ordered by importance
    if fixed[0]:  # always-on group = the 12 most frequently active neurons
        assert set(p.perm[:12]) == set(np.argsort(-stats.frequency, kind="stable")[:12])


@pytest.mark.parametrize("method", ["anneal", "genetic"])
def test_solver_beats_random_within_budget(stats, method):
    best = partition(stats, 8, method, seed=1, iters=2000)
    randoms = [partition(stats, 8, "random", seed=s).objective for s in range(5)]
    assert best.iterations <= 2000
    assert best.objective > 1.1 * max(randoms)
    assert best.objective >= partition(stats, 8, "contiguous").objective


@pytest.mark.parametrize("method", ["anneal", "genetic", "random"])
def test_same_seed_same_partition(stats, method):
    a, b = (partition(stats, 4, method, seed=7, iters=500) for _ in range(2))
    assert np.array_equal(a.perm, b.perm)
    assert not np.array_equal(a.perm, partition(stats, 4, method, seed=8, iters=500).perm)


def test_time_budget_stops_the_solver(stats):
    p = partition(stats, 8, "anneal", seed=0, iters=10**9, budget_s=0.2)
    assert 0 < p.iterations < 10**9
    assert sorted(p.perm.tolist()) == list(range(96))


@pytest.mark.parametrize("groups, match", [(97, "larger than"), (7, "does not divide"), (0, "positive")])
def test_bad_group_counts(stats, groups, match):
    with pytest.raises(InputError, match=match):
        partition(stats, groups, "anneal")


def test_sampled_coactivation_tracks_the_exact_one(engines):
    """Above the memory cap C comes from a reservoir sample of tokens: same statistics, bounded memory."""
    from edgeprism.refactor.calibrate import calibrate, calibration_ids

    eng = engines[0]
    ids = calibration_ids(eng.tokenizer, None, 512, 0)
    exact = next(calibrate(eng, ids))  # layer 0 only
    sampled = next(calibrate(eng, ids, coact_bytes=1))  # a 64-token reservoir per expert
    e = max(range(8), key=lambda i: exact.experts[i].tokens)
    a, b = exact.expert(e), sampled.expert(e)
    assert a.tokens == b.tokens > 64 and len(sampled.experts[e].sample) == 64
    assert np.allclose(a.importance, b.importance) and np.allclose(a.frequency, b.frequency)
    assert np.corrcoef(a.coact.ravel(), b.coact.ravel())[0, 1] > 0.8


# ---- artifact and equivalence -------------------------------------------------------------------


def test_artifact_contents(refactored):
    manifest = json.loads((refactored / artifact.MANIFEST).read_text())
    assert manifest["format"] == artifact.FORMAT and manifest["version"] == artifact.VERSION
    assert manifest["groups"] == 8 and manifest["calibration"]["tokens"] == 512
    assert manifest["source"]["fingerprint"] == artifact.fingerprint(MODEL)
    assert manifest["solver"]["objective"] > manifest["solver"]["random_objective"]
    art = artifact.Refactored.open(refactored)
    assert art.perm.shape == (6, 8, 384) and art.core.shape == (6, 8, 8, 4)
    assert torch.equal(art.perm.sort(-1).values, torch.arange(384).expand(6, 8, 384))
    assert sorted(p.name for p in refactored.parent.iterdir()) == ["anneal-g8"]  # no temp dir left


def test_full_quality_gives_the_original_logits(engines):
    base, art = engines
    torch.testing.assert_close(art.logits(IDS), base.logits(IDS), atol=1e-5, rtol=0)
    assert art.generate_ids(IDS, max_new_tokens=24) == base.generate_ids(IDS, max_new_tokens=24)
    assert art.stats()["units_dropped"] == 0


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_any_permutation_keeps_every_family_exact(checkpoints, tmp_path, name):
    """The load side of the artifact on every family: a random neuron order at G=2 changes nothing."""
    path = checkpoints[name]
    spec = edgeprism.load(path, device="cpu", dtype="fp32").spec
    L, E, inter = len(spec.moe_layers), spec.num_experts, spec.moe_intermediate
    gen = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(inter, generator=gen) for _ in range(L * E)]).view(L, E, inter)
    tensors = {"perm": perm, "importance": torch.ones(L, E, 2), "core": torch.zeros(L, E, 2, 1, dtype=torch.long),
               "core_scale": torch.ones(L, E, 2)}
    manifest = {"source": {"path": str(path), "relpath": os.path.relpath(path, tmp_path),
                           "fingerprint": artifact.fingerprint(path)}, "groups": 2, "always_on": False,
                "dropped": False}
    artifact.write(tmp_path, manifest, tensors)
    base, art = (edgeprism.load(p, device="cpu", dtype="fp32", prefill_chunk=4) for p in (path, tmp_path))
    torch.testing.assert_close(art.logits(IDS), base.logits(IDS), atol=1e-5, rtol=1e-5)
    assert art.generate_ids(IDS, max_new_tokens=16) == base.generate_ids(IDS, max_new_tokens=16)


def test_artifact_checks(refactored, tmp_path):
    with pytest.raises(ConfigError, match="groups"):
        edgeprism.load(refactored, device="cpu", groups=4)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (artifact.MANIFEST, artifact.TENSORS):
        (bad / f).write_bytes((refactored / f).read_bytes())
    manifest = json.loads((bad / artifact.MANIFEST).read_text())
    manifest["source"]["relpath"] = os.path.relpath(MODEL, bad)
    (bad / artifact.MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ArtifactError, match="version"):
        edgeprism.load(bad, device="cpu")
    manifest["source"]["fingerprint"] = "0" * 64
    (bad / artifact.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="fingerprint"):
        edgeprism.load(bad, device="cpu")


# ---- keep ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, True, "0.5", None])
def test_keep_is_validated_on_every_call(engines, keep):
    eng = engines[1]
    calls = [lambda: eng.logits(IDS, keep=keep), lambda: eng.generate_ids(IDS, 4, keep=keep),
             lambda: eng.stream_ids(IDS, 4, keep=keep), lambda: eng.generate("Hi", keep=keep),
             lambda: eng.stream("Hi", keep=keep)]
    for call in calls:
        with pytest.raises(InputError, match="keep"):
            call()


def test_keep_one_is_bit_identical_and_lower_keep_computes_less(engines):
    eng = engines[1]
    assert torch.equal(eng.logits(IDS, keep=1.0), eng.logits(IDS))
    computed = []
    for keep in (1.0, 0.9, 0.6, 0.3):
        eng.reset_stats()
        eng.logits(IDS, keep=keep)
        s = eng.stats()
        assert s["units_computed"] + s["units_dropped"] == len(IDS) * 6 * 2 * 8
        computed.append(s["units_computed"])
    assert computed[0] == len(IDS) * 96 and computed == sorted(computed, reverse=True) and computed[-1] < computed[0]


@pytest.mark.parametrize("fraction, gather_limit", [(0.25, 256 * 2**20), (0.25, 0), (1.0, 0)])
def test_skipping_is_the_same_on_every_path(refactored, engines, fraction, gather_limit):
    """Static (all resident), gathered (decode) and unit-by-unit paths drop the same units."""
    static = engines[1]
    eng = edgeprism.load(refactored, device="cpu", dtype="fp32", cache_fraction=fraction,
                         gather_limit=gather_limit, prefetch=False)
    torch.testing.assert_close(eng.logits(IDS, keep=0.7), static.logits(IDS, keep=0.7), atol=1e-5, rtol=1e-5)
    assert eng.generate_ids(IDS, 12, keep=0.7) == static.generate_ids(IDS, 12, keep=0.7)
    if fraction < 1:  # skipped units are never acquired (so never copied)
        acquired = []
        for keep in (1.0, 0.5):
            eng.reset_stats()
            eng.generate_ids(IDS, 8, keep=keep)
            acquired.append(eng.stats()["hits"] + eng.stats()["misses"])
        assert acquired[1] < acquired[0]


def test_static_gate_and_no_artifact_gate(engines):
    base, art = engines
    for eng in (base, art):
        eng.reset_stats()
        assert eng.generate("The read() system call", max_new_tokens=6, temperature=0, keep=0.5)
        assert eng.stats()["units_dropped"] > 0
    art.gate.mode = "static"
    try:
        assert art.logits(IDS, keep=0.6).shape == (len(IDS), 8192)
    finally:
        art.gate.mode = "score"


def test_gate_rules():
    """Mass ranking keeps a prefix holding `keep` of the mass; always-on runs, the dropped group never."""
    from edgeprism.moe.gate import UnitGate

    gen = torch.Generator().manual_seed(0)
    importance = {0: torch.rand(6, 4, generator=gen) + 0.01}
    ids = torch.tensor([[0, 3], [5, 1], [2, 4]])
    weights = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.5, 0.5]])
    x = torch.zeros(3, 8)
    plain = UnitGate(4, importance)
    kept = []
    for keep in (0.99, 0.7, 0.3, 0.01):
        plain.keep = keep
        units = plain(0, x, ids, weights)
        mass = (weights[..., None] * plain.shares(0, x, ids))
        assert (mass * (units > 0)).sum(dim=(1, 2)).ge(keep * mass.sum(dim=(1, 2)) - 1e-6).all()
        assert ((units == 0) | (units == weights[..., None])).all()  # a unit runs at its router weight or not at all
        kept.append(int((units > 0).sum()))
    assert kept == sorted(kept, reverse=True) and kept[-1] == 3  # at least one unit per token
    fixed = UnitGate(4, importance, always_on=True, dropped=True)
    fixed.keep = 0.01
    units = fixed(0, x, ids, weights)
    assert (units[..., 0] > 0).all() and (units[..., -1] == 0).all()
    assert int(fixed.units_dropped) == int((units == 0).sum())


# ---- bad input leaves nothing behind -------------------------------------------------------------


def test_missing_calibration_file(tmp_path):
    with pytest.raises(InputError, match="calibration file"):
        refactor(MODEL, tmp_path / "out", SMALL, calib=tmp_path / "nope.txt")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_problems(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        refactor(MODEL, tmp_path / "exists", SMALL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="does not exist"):
        refactor(MODEL, tmp_path / "file" / "out", SMALL)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(OutputError, match="permission"):
        refactor(MODEL, locked / "out", SMALL)


def test_unsupported_model_and_bad_groups(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError):
        refactor(tmp_path / "llama", tmp_path / "out1", SMALL)
    with pytest.raises(InputError, match="does not divide"):
        refactor(MODEL, tmp_path / "out2", RefactorOptions(groups=7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_failure_midway_leaves_no_partial_artifact(tmp_path):
    def boom(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        refactor(MODEL, tmp_path / "out", SMALL, progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_cli_refactor_errors(tmp_path):
    cmd = [sys.executable, "-m", "edgeprism.cli", "refactor", str(MODEL), "--out", str(tmp_path / "o"), "--groups", "500"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "larger than the expert intermediate size 384" in done.stderr
    assert list(tmp_path.iterdir()) == []
