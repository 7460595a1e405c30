"""What each token asks of the planner: the quality floor `keep` and the per-layer latency budget.

`scheduler.plan` decides one layer given `keep` (the share of routed score mass it must keep) and an
optional `budget_s`; this module chooses those two numbers per token, from a user's target:

- **quality** (in (0, 1], 1 = no loss): a measured **operating-points table** maps it to a `keep`
  (`OperatingPoints.keep_for_quality`); without a table the target itself is used as the mass floor,
  a proxy only (kept mass is not perplexity: profile the model for the real mapping). No budget: the
  planner minimises latency above the floor.
- **latency** (ms per token): `QosController` adapts one per-layer `budget_s` from the measured step
  times so that steps sit near the target with the least quality loss (the planner with a budget
  keeps the most mass that fits); `keep` is only the floor `min_keep` (default 0.5: never drop more
  than half the mass to chase a latency), raised by a table to the highest keep whose measured
  latency is within 5% of the fastest point's (`OperatingPoints.plateau_keep`): dropping more would
  cost quality and buy no speed, so an unreachable target pins the floor there, not at 0.5.

The table is measured by `profile(measure, keeps)` (the engine supplies `measure(keep) -> (quality,
ms_per_token)`), saved as JSON beside the model (`OperatingPoints.default_path`). Everything here is
plain Python: no tensors, no CUDA, deterministic.

Latency controller
------------------
The target T holds for a percentile of step times (`percentile`, default 0.95: a latency target is
a bound most tokens meet; 0.5 holds the median and keeps more mass). The controller steers the
median step to a setpoint T − tail, with tail = p(percentile) − p50 of the last `window` steps (0
until TAIL_MIN steps, at most MAX_TAIL·T): the fast loop below sees medians, the slow tail estimate
moves the median so that the percentile lands on T. Steps taken with the budget pinned at a bound
(target unreachable, or so loose that nothing binds) are not the controlled loop's: they leave the
tail window, which starts again when the budget comes off the bound. After a change of regime within
the bounds (the machine gets faster) the window mixes both regimes and overstates the tail for up to
`window` tokens: steps run faster than needed, a conservative transient.

State: ô, the *effective overhead* of a token (seconds not spent in the layers' budgets); the budget
is b = (T − ô)/L for L MoE layers, clamped to [MIN_SHARE, MAX_SHARE] × T/L. Each observed step s
gives the error e = s − (T − tail); the controller takes the median of the last three errors
(a single outlier is never the median of three), clips it to ±MAX_ERROR·T and integrates it:
ô ← ô + GAIN·e, then clamps ô to the range that maps into the budget bounds (anti-windup: the state
never runs past a bound it cannot act beyond). The first observation that reports `planned_s` (the
sum of the layers' predicted latencies) seeds ô = s − planned_s, the measured non-MoE time, so the
loop starts near its fixed point instead of at b = T/L.

Why it converges: while budgets bind, a layer's plan takes about b, so s ≈ O + n·k·b with n the
layers whose budget binds and k the ratio of real to predicted MoE time; ds/dô = −n·k/L and the loop
gain is GAIN·n·k/L ≤ GAIN·k: without oscillation for k < 1/GAIN = 4, stable for k < 8 (less with the
median filter's one-token delay; tests/test_qos.py runs k = 3). GAIN trades that margin against speed:
the error shrinks by about 1 − GAIN·n·k/L per token. Integral action removes the steady error the plans' discrete
slack leaves (a plan is the largest option ≤ b, not b). With an unreachable target every plan is the
fastest (b at its lower bound, keep = min_keep); once the target becomes reachable, b climbs at up
to GAIN·MAX_ERROR·T/L per token, so it recovers in a few tokens.

One budget for every layer of a token: the controller only sees whole-token timings, so it has no
basis to favour a layer, and each layer's plan already spends less where units are resident.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgeprism.errors import InputError, OutputError, ProfileError
from edgeprism.schedule.cost import default_cache_dir

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
DEFAULT_KEEPS = (1.0, 0.98, 0.95, 0.9, 0.85, 0.8)
PLATEAU_TOL = 0.05  # latency within this share of the fastest point counts as no faster (plateau_keep)
WINDOW = 64  # step times kept for summary()'s percentiles
GAIN = 0.25  # share of the filtered error corrected per token
MEDIAN_OF = 3  # errors in the outlier filter
MAX_ERROR = 0.5  # filtered error clipped to ±MAX_ERROR × target: bounds a burst of outliers
MIN_SHARE = 1e-3  # budget bounds as multiples of the even share T/L; the planner needs a budget > 0
MAX_SHARE = 4.0  # a layer may take 4× its even share (others all hits), not more: bounds upward windup
TAIL_MIN = 32  # steps in the window before the tail allowance is used (the p95 of 32 is not their maximum)
MAX_TAIL = 0.5  # the tail allowance is at most half the target


@dataclass(frozen=True)
class OperatingPoint:
    """One measured setting: the planner's mass floor `keep`, `quality` = ppl_ref / ppl at it (1.0 = no
    loss, on held-out text) and the measured decode latency."""

    keep: float
    quality: float
    ms_per_token: float

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise InputError(f"operating point keep={self.keep}: must be in (0, 1]")
        if not 0.0 < self.quality < math.inf:
            raise InputError(f"operating point quality={self.quality} (keep {self.keep}): must be finite and > 0")
        if not 0.0 < self.ms_per_token < math.inf:
            raise InputError(f"operating point ms_per_token={self.ms_per_token} (keep {self.keep}): "
                             "must be finite and > 0")


@dataclass(frozen=True)
class OperatingPoints:
    """A model's measured operating points on one machine and VRAM budget, highest keep first."""

    points: tuple[OperatingPoint, ...]
    vram_gb: float | None  # None: the whole device
    device: str
    expert_dtype: str
    date: str  # ISO date of the measurement

    def __post_init__(self) -> None:
        if not self.points:
            raise InputError("an operating-points table needs at least one point")
        keeps = [p.keep for p in self.points]
        if len(set(keeps)) != len(keeps):
            raise InputError(f"operating points measured twice at one keep: {sorted(keeps, reverse=True)}")
        object.__setattr__(self, "points", tuple(sorted(self.points, key=lambda p: -p.keep)))

    def keep_for_quality(self, quality: float) -> float:
        """The lowest keep whose measured quality is ≥ `quality`, trusting a point only if every point
        above it (higher keep) reaches `quality` too; 1.0 (drop nothing) if the highest point misses.

        Assumption: true quality does not rise as keep falls (dropping mass loses information), and
        latency does not rise either (a lower floor never gives the planner a slower plan), so the lowest
        qualifying keep is also the fastest; measured ms are not consulted. Measurements are noisy, so
        the table need not be monotone: a point that reaches `quality` below one that misses it is
        taken for noise and not used. No interpolation: quality between points was not measured.
        """
        if not 0.0 < quality <= 1.0:
            raise InputError(f"quality target {quality}: must be in (0, 1] (1 = no loss)")
        keep = 1.0
        for p in self.points:
            if p.quality < quality:
                break
            keep = p.keep
        return keep

    def plateau_keep(self, tolerance: float = PLATEAU_TOL) -> float:
        """The highest keep whose measured latency is within `tolerance` of the fastest point's: below
        it, dropping more mass bought no measured speed, only quality loss. Latency mode uses it as
        its floor, so an unreachable target does not push the planner to drop for nothing."""
        fastest = min(p.ms_per_token for p in self.points)
        return max(p.keep for p in self.points if p.ms_per_token <= fastest * (1.0 + tolerance))

    def to_json(self) -> dict:
        return {"version": PROFILE_VERSION, "vram_gb": self.vram_gb, "device": self.device,
                "expert_dtype": self.expert_dtype, "date": self.date, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, d: object) -> OperatingPoints:
        """Raises `ProfileError` (not KeyError/TypeError) on anything but a valid table of this version."""
        if not isinstance(d, dict):
            raise ProfileError(f"an operating-points table is a JSON object, got {type(d).__name__}")
        if d.get("version") != PROFILE_VERSION:
            raise ProfileError(f"operating-points table version {d.get('version')!r}, this edgeprism reads "
                               f"{PROFILE_VERSION}: run `edgeprism profile` again")
        try:
            points = tuple(OperatingPoint(float(p["keep"]), float(p["quality"]), float(p["ms_per_token"]))
                           for p in d["points"])
            vram = d["vram_gb"]
            return cls(points, None if vram is None else float(vram), str(d["device"]), str(d["expert_dtype"]),
                       str(d["date"]))
        except (KeyError, TypeError, ValueError) as e:  # InputError is a ValueError
            raise ProfileError(f"operating-points table is invalid ({type(e).__name__}: {e}): "
                               "run `edgeprism profile` again") from e

    def save(self, path: Path | str) -> Path:
        """Write the table as JSON, atomically (a concurrent reader sees the old file or the new one)."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.to_json(), indent=1))
            tmp.replace(path)
        except OSError as e:
            with contextlib.suppress(OSError):  # best effort: the temporary file may never have been made
                tmp.unlink()
            raise OutputError(f"cannot write the operating-points table {path} ({e}): pass a writable path") from e
        return path

    @classmethod
    def load(cls, path: Path | str) -> OperatingPoints:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ProfileError(f"cannot read the operating-points table {path} ({e}): run `edgeprism profile` "
                               "to measure it, or pass its path") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ProfileError(f"operating-points table {path} is not valid JSON ({e}): "
                               "delete it and run `edgeprism profile` again") from e
        try:
            return cls.from_json(data)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from e

    @staticmethod
    def default_path(model_dir: Path | str, vram_gb: float | None) -> Path:
        """`<model_dir>/edgeprism-profile-<vram>gb.json` if it exists or the directory is writable; else
        the same name, prefixed by the model directory's name and a hash of its path, in the user cache
        (`$EDGEPRISM_CACHE_DIR/profile`, else `$XDG_CACHE_HOME/edgeprism/profile`, else ~/.cache/...).
        The device is not in the name: check `device` of a loaded table against the machine."""
        name = f"edgeprism-profile-{'fullvram' if vram_gb is None else f'{vram_gb:g}gb'}.json"
        model_dir = Path(model_dir)
        beside = model_dir / name
        if beside.exists() or os.access(model_dir, os.W_OK | os.X_OK):
            return beside
        resolved = model_dir.resolve()
        digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        return default_cache_dir().parent / "profile" / f"{resolved.name}-{digest}-{name}"


def profile(measure: Callable[[float], tuple[float, float]], keeps: Sequence[float] = DEFAULT_KEEPS, *,
            vram_gb: float | None, device: str, expert_dtype: str, date: str | None = None) -> OperatingPoints:
    """Measure an operating-points table: `measure(keep)` returns (quality = ppl_ref / ppl, ms per token)
    at that floor, and is called once per keep in the given order (the default starts at 1.0, the
    reference). `date` defaults to today (UTC)."""
    if not keeps or any(not 0.0 < k <= 1.0 for k in keeps) or len(set(keeps)) != len(keeps):
        raise InputError(f"keeps={tuple(keeps)}: need distinct values in (0, 1]")
    points = []
    for keep in keeps:
        quality, ms = measure(keep)
        points.append(OperatingPoint(keep, quality, ms))
        log.info("operating point keep=%.3f: quality %.4f, %.2f ms/token", keep, quality, ms)
    table = OperatingPoints(tuple(points), vram_gb, device, expert_dtype,
                            date or datetime.now(timezone.utc).date().isoformat())
    qualities = [p.quality for p in table.points]
    if any(lo > hi for hi, lo in itertools.pairwise(qualities)):
        log.warning("measured quality rises as keep falls (%s): noisy measurement; keep_for_quality ignores "
                    "a point below one that misses its target", qualities)
    return table


class QosController:
    """Per token, the `(keep, budget_s)` of every MoE layer's `plan` call, from a latency or quality target.

    Quality mode is fixed (table or proxy, see the module docstring); latency mode adapts the budget
    from `observe`d step times so that the `percentile` step time sits at `latency_ms`. `min_keep` is
    the floor of latency mode, raised to `table.plateau_keep()` when a table is given (dropping below
    it measured no faster); quality mode maps its target through `table`; `window` steps feed the
    percentiles.
    """

    def __init__(self, layers: int, *, latency_ms: float | None = None, quality: float | None = None,
                 table: OperatingPoints | None = None, min_keep: float = 0.5, percentile: float = 0.95,
                 window: int = WINDOW) -> None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise InputError(f"layers={layers!r}: the number of MoE layers, a positive int")
        if (latency_ms is None) == (quality is None):
            raise InputError("give exactly one target: latency_ms (per-token decode latency) or quality (in (0, 1])")
        if quality is not None and not 0.0 < quality <= 1.0:
            raise InputError(f"quality={quality}: must be in (0, 1] (ppl_ref / ppl; 1 = no loss)")
        _check_latency_args(latency_ms, min_keep, percentile, window)
        self.layers = layers
        self.latency_s = None if latency_ms is None else latency_ms / 1e3
        self.quality = quality
        self.percentile = percentile
        if quality is not None:
            self.keep = quality if table is None else table.keep_for_quality(quality)
        else:  # latency: never below min_keep, nor below where the table shows dropping stops paying
            self.keep = min_keep if table is None else max(min_keep, table.plateau_keep())
        self.tokens = 0
        self._steps: deque[float] = deque(maxlen=window)  # seconds, for summary()
        self._tail_steps: deque[float] = deque(maxlen=window)  # the same, since the budget left a bound
        self._errors: deque[float] = deque(maxlen=MEDIAN_OF)  # step − setpoint (target − tail), latency mode
        self._overhead = 0.0  # ô: effective non-budget seconds of a token (latency mode)
        self._seeded = False  # ô seeded from a step's measured − planned time

    def targets(self) -> tuple[float, float | None]:
        """(keep, budget_s) for every MoE layer's `plan` call of the next token."""
        return self.keep, self.budget_s

    @property
    def budget_s(self) -> float | None:
        if self.latency_s is None:
            return None
        return (self.latency_s - self._overhead) / self.layers

    def observe(self, step_s: float, planned_s: float | None = None) -> None:
        """Report a token: its measured wall time, and the sum of its layers' predicted latencies if known."""
        if not 0.0 <= step_s < math.inf:
            raise InputError(f"step_s={step_s}: a token's measured time must be finite and ≥ 0 seconds")
        if planned_s is not None and not 0.0 <= planned_s < math.inf:
            raise InputError(f"planned_s={planned_s}: the layers' predicted time must be finite and ≥ 0 seconds")
        self.tokens += 1
        self._steps.append(step_s)
        if self.latency_s is None:
            return
        self._tail_steps.append(step_s)
        target = self.latency_s
        if planned_s is not None and not self._seeded:
            self._seeded = True
            self._errors.clear()
            self._set_overhead(step_s - planned_s, target)
            return
        self._errors.append(step_s - (target - self._tail_allowance(target)))
        error = min(max(statistics.median(self._errors), -MAX_ERROR * target), MAX_ERROR * target)
        self._set_overhead(self._overhead + GAIN * error, target)

    def _tail_allowance(self, target: float) -> float:
        """How far the median step must sit below the target for the `percentile` step to meet it: the
        tail window's p(percentile) − p50, once it holds TAIL_MIN steps (so one outlier is never the
        percentile read), at most MAX_TAIL × target."""
        return _tail_allowance(self._tail_steps, self.percentile, target)

    def _set_overhead(self, overhead: float, target: float) -> None:
        """ô clamped so that the budget stays in [MIN_SHARE, MAX_SHARE] × target / layers (anti-windup);
        at a bound the tail window starts again."""
        lo, hi = target * (1.0 - MAX_SHARE), target * (1.0 - MIN_SHARE)
        self._overhead = min(max(overhead, lo), hi)
        if self._overhead in (lo, hi):
            self._tail_steps.clear()

    def summary(self) -> dict[str, float | int | str | None]:
        """Target, current keep and per-layer budget (latency mode: also the overhead estimate ô and the tail
        allowance), p50/p95 of the last `window` steps (ms), and the tokens observed."""
        steps = sorted(self._steps)
        budget = self.budget_s
        return {"mode": "quality" if self.latency_s is None else "latency",
                "target_ms": None if self.latency_s is None else self.latency_s * 1e3,
                "target_quality": self.quality,
                "keep": self.keep,
                "budget_ms": None if budget is None else budget * 1e3,
                "overhead_ms": None if self.latency_s is None else self._overhead * 1e3,
                "percentile": None if self.latency_s is None else self.percentile,
                "tail_ms": None if self.latency_s is None else self._tail_allowance(self.latency_s) * 1e3,
                "p50_ms": _percentile(steps, 0.50) * 1e3 if steps else None,
                "p95_ms": _percentile(steps, 0.95) * 1e3 if steps else None,
                "tokens": self.tokens}


def _check_latency_args(latency_ms: float | None, min_keep: float, percentile: float, window: int) -> None:
    if latency_ms is not None and not 0.0 < latency_ms < math.inf:
        raise InputError(f"latency_ms={latency_ms}: must be a positive, finite number of milliseconds")
    if not 0.0 < min_keep <= 1.0:
        raise InputError(f"min_keep={min_keep}: must be in (0, 1] (share of routed mass always kept)")
    if not 0.5 <= percentile < 1.0:
        raise InputError(f"percentile={percentile}: the step-time percentile held at latency_ms, in [0.5, 1)")
    if window < TAIL_MIN:
        raise InputError(f"window={window}: need at least {TAIL_MIN} steps for a tail percentile")


def _tail_allowance(window: Sequence[float], percentile: float, target: float) -> float:
    """p(percentile) − p50 of the window once it holds TAIL_MIN steps (so one outlier is never the
    percentile read), at most MAX_TAIL × target; 0 before that or at percentile 0.5."""
    if percentile == 0.5 or len(window) < TAIL_MIN:
        return 0.0
    steps = sorted(window)
    return min(max(_percentile(steps, percentile) - _percentile(steps, 0.5), 0.0), MAX_TAIL * target)


def _percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks of sorted `xs` (numpy's default)."""
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


FLOOR_GAIN = 0.5  # FloorController: floor change per token per unit of relative (filtered) error


class FloorController:
    """Latency mode for `schedule="direct"`: there is no host step per layer to give a budget to, so
    the knob is the per-token kept-mass floor itself (the graphs drop each layer's lowest-weighted
    misses down to it). Same interface as `QosController` (`targets`, `observe`, `summary`).

    Integral control on the relative error: the median of the last MEDIAN_OF steps minus the
    setpoint (target − tail allowance, as in `QosController`), clipped to ±MAX_ERROR, moves the floor
    by −FLOOR_GAIN × error / target per token, within [`min_keep` (raised to the table's plateau
    keep), 1]. Step time falls as the floor falls (fewer bytes read), so the loop settles where the
    percentile step meets the target; an unreachable target pins the floor at its minimum, and a
    loose one returns it to 1 (the exact graphs)."""

    def __init__(self, *, latency_ms: float, table: OperatingPoints | None = None, min_keep: float = 0.5,
                 percentile: float = 0.95, window: int = WINDOW) -> None:
        _check_latency_args(latency_ms, min_keep, percentile, window)
        self.latency_s, self.quality, self.percentile = latency_ms / 1e3, None, percentile
        self.min_keep = min_keep if table is None else max(min_keep, table.plateau_keep())
        self.keep = 1.0  # start exact; the loop lowers it only as far as the target needs
        self.tokens = 0
        self._steps: deque[float] = deque(maxlen=window)
        self._errors: deque[float] = deque(maxlen=MEDIAN_OF)

    def targets(self) -> tuple[float, float | None]:
        return self.keep, None

    def observe(self, step_s: float, planned_s: float | None = None) -> None:
        """Report a token's measured wall time (`planned_s` is not used: nothing is planned)."""
        if not 0.0 <= step_s < math.inf:
            raise InputError(f"step_s={step_s}: a token's measured time must be finite and ≥ 0 seconds")
        self.tokens += 1
        self._steps.append(step_s)
        target = self.latency_s
        self._errors.append(step_s - (target - _tail_allowance(self._steps, self.percentile, target)))
        error = min(max(statistics.median(self._errors), -MAX_ERROR * target), MAX_ERROR * target)
        self.keep = min(max(self.keep - FLOOR_GAIN * error / target, self.min_keep), 1.0)

    def summary(self) -> dict[str, float | int | str | None]:
        steps = sorted(self._steps)
        return {"mode": "latency", "target_ms": self.latency_s * 1e3, "target_quality": None, "keep": self.keep,
                "budget_ms": None, "min_keep": self.min_keep, "percentile": self.percentile,
                "p50_ms": _percentile(steps, 0.50) * 1e3 if steps else None,
                "p95_ms": _percentile(steps, 0.95) * 1e3 if steps else None, "tokens": self.tokens}
