"""Group an expert's I neurons into G equal-size sub-experts that fire together.

Objective (maximised): the within-group co-activation ``f = sum_g 1_g^T C 1_g`` where
``C = sum_t c_t c_t^T`` and ``c_t`` is token t's per-neuron |contribution| to the expert output
(L1-normalised per token). Since ``f = sum_t sum_g m_tg^2`` with ``m_tg`` the token's mass in group
g, a larger f means a token's mass falls in fewer groups, so more groups can be skipped for the
same loss. The solvers (simulated annealing, a genetic algorithm) start from a balanced k-means of
the neurons' co-activation profiles; `contiguous`, `random` and `topbottom` (importance-sorted,
MoEpic's top/bottom segments) are the baselines, from the same code.

Optional fixed groups, taken out before solving (MoE-Prism): an always-on group of the most
frequently active neurons (group 0) and a dropped group of the least active ones (group G-1).
Every solver is deterministic under its seed and iteration budget; `budget_s` is a safety cap
that stops early (and says so in `Partition.iterations`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgeprism.errors import InputError

METHODS = ("anneal", "genetic", "contiguous", "random", "topbottom")


@dataclass(frozen=True)
class NeuronStats:
    """Calibration statistics of one expert's I neurons (see `refactor/calibrate.py`)."""

    importance: np.ndarray  # [I] mean |contribution| per routed token
    frequency: np.ndarray  # [I] fraction of routed tokens where the neuron is active
    coact: np.ndarray  # [I, I] sum_t c_t c_t^T of L1-normalised |contributions|
    tokens: int  # routed calibration tokens seen


@dataclass(frozen=True)
class Partition:
    """perm[g*Ig:(g+1)*Ig] are group g's neurons; groups ordered always-on, by importance, dropped."""

    perm: np.ndarray  # [I] int64, a permutation of range(I)
    importance: np.ndarray  # [G] summed neuron importance per group
    objective: float  # within-group co-activation f of this grouping
    iterations: int  # solver iterations run (< the budget when budget_s stopped it)
    always_on: bool
    dropped: bool


def check_groups(inter: int, groups: int) -> None:
    """G must be ≥ 1 and divide I: units must have equal size to share one slot pool."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise InputError(f"groups={groups!r}: must be a positive integer.")
    if groups > inter:
        raise InputError(f"groups={groups} is larger than the expert intermediate size {inter}: "
                         "a group needs at least one neuron.")
    if inter % groups:
        divisors = [d for d in range(2, min(inter, 64) + 1) if inter % d == 0]
        raise InputError(f"groups={groups} does not divide the expert intermediate size {inter}; sub-experts "
                         f"must have equal size. Divisors up to 64: {divisors}.")


def objective(coact: np.ndarray, labels: np.ndarray, groups: int) -> float:
    onehot = np.eye(groups)[labels]  # [I, G]
    return float(((coact @ onehot) * onehot).sum())


def partition(stats: NeuronStats, groups: int, method: str, *, seed: int = 0, iters: int = 20000,
              budget_s: float | None = None, always_on: bool = False, dropped: bool = False,
              split: float = 0.5) -> Partition:
    """Group the neurons of one expert. `iters` bounds the solver (deterministic); `budget_s` caps its time."""
    inter = len(stats.importance)
    check_groups(inter, groups)
    if method not in METHODS:
        raise InputError(f"method={method!r}: use one of {', '.join(METHODS)}.")
    fixed = int(always_on) + int(dropped)
    if fixed >= groups:
        raise InputError(f"groups={groups} leaves no group to solve after the always-on/dropped groups; use more groups.")
    rng = np.random.default_rng(seed)
    size = inter // groups
    order = np.argsort(-stats.frequency, kind="stable")
    head = order[:size] if always_on else order[:0]
    tail = order[inter - size:] if dropped else order[:0]
    free = np.setdiff1d(np.arange(inter), np.concatenate([head, tail]))  # sorted
    free_groups = groups - fixed
    coact = stats.coact[np.ix_(free, free)]
    deadline = None if budget_s is None else time.monotonic() + budget_s
    labels, done = _solve(method, coact, stats.importance[free], free_groups, rng, iters, deadline, split)
    members = [free[labels == g] for g in range(free_groups)]
    members.sort(key=lambda m: -float(stats.importance[m].sum()))
    parts = ([head] if always_on else []) + members + ([tail] if dropped else [])
    perm = np.concatenate([np.sort(m) for m in parts]).astype(np.int64)
    final = np.repeat(np.arange(groups), size)[np.argsort(perm)]
    return Partition(perm=perm, importance=np.array([stats.importance[m].sum() for m in parts]),
                     objective=objective(stats.coact, final, groups), iterations=done,
                     always_on=always_on, dropped=dropped)


def _solve(method: str, coact: np.ndarray, importance: np.ndarray, groups: int, rng: np.random.Generator,
           iters: int, deadline: float | None, split: float) -> tuple[np.ndarray, int]:
    """Labels [n] in range(groups), each group n/groups neurons; and the iterations run."""
    n = len(importance)
    size = n // groups
    if method == "contiguous":
        return np.arange(n) // size, 0
    if method == "random":
        return rng.permutation(n) // size, 0
    if method == "topbottom":
        return _topbottom(importance, groups, split), 0
    labels = balanced_kmeans(coact, groups, rng)
    if method == "anneal":
        return anneal(coact, labels, groups, rng, iters, deadline)
    return genetic(coact, labels, groups, rng, iters, deadline)


def _topbottom(importance: np.ndarray, groups: int, split: float) -> np.ndarray:
    """MoEpic: neurons sorted by importance; the top segment is the first round(split·G) groups.

    Within a segment the order is by importance too, so the groups are importance-sorted chunks;
    `split` only says where the segment boundary is (recorded in the manifest).
    """
    n = len(importance)
    labels = np.empty(n, dtype=np.int64)
    labels[np.argsort(-importance, kind="stable")] = np.arange(n) // (n // groups)
    return labels


def balanced_kmeans(coact: np.ndarray, groups: int, rng: np.random.Generator, rounds: int = 10) -> np.ndarray:
    """k-means on the neurons' normalised co-activation profiles with equal-size clusters.

    Assignment is greedy by distance under a capacity of n/groups per cluster, which keeps the
    clusters balanced (the solvers only swap, so balance holds from here on).
    """
    n = coact.shape[0]
    size = n // groups
    feats = coact / (np.linalg.norm(coact, axis=1, keepdims=True) + 1e-12)  # [n, n]
    centers = feats[rng.choice(n, groups, replace=False)]
    labels = np.arange(n) // size
    for _ in range(rounds):
        new = _capacity_assign(_dist(feats, centers), size)
        if np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([feats[labels == g].mean(0) for g in range(groups)])
    return labels


def _dist(feats: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return (feats ** 2).sum(1)[:, None] - 2 * feats @ centers.T + (centers ** 2).sum(1)[None]  # [n, G]


def _capacity_assign(dist: np.ndarray, size: int) -> np.ndarray:
    """Neurons with the clearest preference first, each to its nearest cluster with room left.

    Vectorised sequential greedy: every remaining neuron picks its nearest open cluster; the run
    up to the first neuron whose pick is already full is exactly what the one-by-one loop does,
    so it is accepted at once; the full cluster closes and the rest pick again (≤ G+1 rounds).
    """
    n, groups = dist.shape
    order = np.argsort(dist.min(1), kind="stable")
    labels = np.empty(n, dtype=np.int64)
    left = np.full(groups, size)
    start = 0
    while start < n:
        rest = order[start:]
        choice = np.argmin(np.where(left > 0, dist[rest], np.inf), axis=1)  # [m]
        rank = np.cumsum(np.eye(groups, dtype=np.int64)[choice], axis=0)[np.arange(len(rest)), choice]
        over = rank > left[choice]
        stop = int(np.argmax(over)) if over.any() else len(rest)
        labels[rest[:stop]] = choice[:stop]
        left -= np.bincount(choice[:stop], minlength=groups)
        start += stop
    return labels


def _swap_gains(coact: np.ndarray, links: np.ndarray, labels: np.ndarray, i: np.ndarray,
                j: np.ndarray) -> np.ndarray:
    """Change of f when neurons i and j (in different groups) swap; links[n, g] = sum_{m in g} C[n, m]."""
    a, b = labels[i], labels[j]
    c_ij, diag = coact[i, j], np.diagonal(coact)
    return 2 * (links[j, a] - c_ij - links[i, a] + diag[i] + links[i, b] - c_ij - links[j, b] + diag[j])


def _apply_swap(coact: np.ndarray, links: np.ndarray, labels: np.ndarray, i: int, j: int) -> None:
    a, b = labels[i], labels[j]
    delta = coact[:, j] - coact[:, i]
    links[:, a] += delta
    links[:, b] -= delta
    labels[i], labels[j] = b, a


def anneal(coact: np.ndarray, labels: np.ndarray, groups: int, rng: np.random.Generator, iters: int,
           deadline: float | None, proposals: int = 16) -> tuple[np.ndarray, int]:
    """Simulated annealing over swaps: each step draws `proposals` swaps, takes the best, accepts it
    by the Metropolis rule at a geometrically cooling temperature; returns the best grouping seen."""
    n = len(labels)
    labels = labels.copy()
    links = coact @ np.eye(groups)[labels]  # [n, G]
    i, j = rng.integers(0, n, (2, 256))
    probe = np.abs(_swap_gains(coact, links, labels, i, j)[labels[i] != labels[j]])
    t0 = max(float(probe.mean()) if probe.size else 0.0, 1e-30)  # 0 when the expert never fired
    t_end = t0 * 1e-4
    score = objective(coact, labels, groups)
    best, best_score = labels.copy(), score
    done = 0
    for step in range(iters):
        if deadline is not None and step % 256 == 0 and time.monotonic() > deadline:
            break
        temp = t0 * (t_end / t0) ** (step / max(1, iters - 1))
        i, j = rng.integers(0, n, (2, proposals))
        gains = np.where(labels[i] != labels[j], _swap_gains(coact, links, labels, i, j), -np.inf)
        k = int(np.argmax(gains))
        u = rng.random()
        if np.isfinite(gains[k]) and (gains[k] > 0 or u < np.exp(gains[k] / max(temp, 1e-30))):
            _apply_swap(coact, links, labels, int(i[k]), int(j[k]))
            score += float(gains[k])
            if score > best_score:
                best, best_score = labels.copy(), score
        done = step + 1
    return best, done


def _local_search(coact: np.ndarray, labels: np.ndarray, groups: int, rng: np.random.Generator,
                  steps: int, proposals: int = 16) -> np.ndarray:
    """Greedy swaps (hill climbing): the genetic algorithm's mutation + repair."""
    links = coact @ np.eye(groups)[labels]
    n = len(labels)
    for _ in range(steps):
        i, j = rng.integers(0, n, (2, proposals))
        gains = np.where(labels[i] != labels[j], _swap_gains(coact, links, labels, i, j), -np.inf)
        k = int(np.argmax(gains))
        if gains[k] > 0:
            _apply_swap(coact, links, labels, int(i[k]), int(j[k]))
    return labels


def _crossover(coact: np.ndarray, p1: np.ndarray, p2: np.ndarray, groups: int,
               rng: np.random.Generator) -> np.ndarray:
    """Keep the tighter half of p1's groups, regroup the other neurons as p2 groups them (balanced)."""
    n = len(p1)
    size = n // groups
    onehot = np.eye(groups)[p1]
    tightness = ((coact @ onehot) * onehot).sum(0)  # [G]
    kept = np.argsort(-tightness)[: groups // 2]
    child = np.full(n, -1)
    for new, g in enumerate(kept):
        child[p1 == g] = new
    rest = np.flatnonzero(child < 0)
    order = rest[np.lexsort((rng.random(len(rest)), p2[rest]))]  # p2's groups stay together
    child[order] = len(kept) + np.arange(len(order)) // size
    return child


def genetic(coact: np.ndarray, labels: np.ndarray, groups: int, rng: np.random.Generator, iters: int,
            deadline: float | None, population: int = 12, steps: int = 64) -> tuple[np.ndarray, int]:
    """Elitist GA: tournament selection, group-preserving crossover, local-search mutation.

    `iters` counts swap proposals like `anneal` does (one generation = population·steps of them).
    """
    pop = [_local_search(coact, labels.copy(), groups, rng, steps)]
    for _ in range(population - 1):
        pop.append(_local_search(coact, _perturb(labels, rng), groups, rng, steps))
    fits = [objective(coact, p, groups) for p in pop]
    generations = max(1, iters // (population * steps))
    done = 0
    for gen in range(generations):
        if deadline is not None and time.monotonic() > deadline:
            break
        children = []
        for _ in range(population):
            a, b = (max(rng.choice(population, 2, replace=False), key=lambda x: fits[x]) for _ in range(2))
            children.append(_local_search(coact, _crossover(coact, pop[a], pop[b], groups, rng), groups, rng, steps))
        everyone = pop + children
        scores = fits + [objective(coact, c, groups) for c in children]
        top = np.argsort(-np.array(scores), kind="stable")[:population]
        pop, fits = [everyone[t] for t in top], [scores[t] for t in top]
        done = (gen + 1) * population * steps
    return pop[int(np.argmax(fits))], done


def _perturb(labels: np.ndarray, rng: np.random.Generator, fraction: float = 0.2) -> np.ndarray:
    out = labels.copy()
    pick = rng.choice(len(out), max(2, int(fraction * len(out))), replace=False)
    out[pick] = out[rng.permutation(pick)]
    return out
