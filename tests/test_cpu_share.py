"""The CPU share of zero-copy decode (`load(schedule="direct", cpu_share=...)`, schedule/cpu_share.py).

Inside the decode step each MoE layer hands part of its misses to a CPU loop (`swiglu_token_loop`,
native) through flags and records in host memory, and adds the CPU's result to its own. On the CPU
the same protocol runs with host tensors, so these tests cover the split, the loop, the flags and the
merge; tests/gpu/test_cpu_share_cuda.py covers the graph and the Triton merge kernel.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import VARIANTS
from test_misses import PROMPT, decode_logits, load_cpu

import edgeprism
from edgeprism.errors import ConfigError, DecodeSyncError
from edgeprism.moe.quant import make_format
from edgeprism.schedule import native
from edgeprism.schedule.cpu_share import CpuShare

pytestmark = pytest.mark.skipif(native.load() is None, reason="the native CPU kernel needs a C compiler")
NAMES = [v.name for v in VARIANTS]


@pytest.fixture(scope="module")
def direct_ref(checkpoints):
    """Direct decode without a CPU share: the logits and tokens a share must reproduce."""
    out = {}
    for name, path in checkpoints.items():
        eng = load_cpu(path, schedule="direct", cache_fraction=0.25)
        out[name] = (decode_logits(eng), eng.generate_ids(PROMPT, max_new_tokens=12))
        eng.close()
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("share", [1.0, 0.5, True])
def test_cpu_share_matches_direct_decode(checkpoints, direct_ref, name, share):
    ref_logits, ref_tokens = direct_ref[name]
    eng = load_cpu(checkpoints[name], schedule="direct", cache_fraction=0.25, cpu_share=share)
    torch.testing.assert_close(decode_logits(eng), ref_logits, rtol=1e-4, atol=1e-4)
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens
    s = eng.stats()
    assert s["cpu_share_bytes"] == s["cpu_share_units"] * s["unit_bytes"]
    assert s["cpu_share_units"] > 0 or share is True or share < 1.0  # a layer with one miss gives ⌊0.5⌋ = 0 units to the CPU
    assert s["cpu_share_busy_s"] > 0 and s["cpu_share_runs"] > 0 and s["cpu_share_wait_s"] >= 0
    if share is not True:
        assert s["cpu_share"] == share
    eng.reset_stats()
    assert eng.stats()["cpu_share_units"] == 0
    eng.close()


def test_cpu_share_counts_the_misses_it_takes(checkpoints):
    """At share 1.0 the CPU computes every miss the GPU would have read; at 0.0 none."""
    path = checkpoints["qwen3moe-headdim"]
    for share in (1.0, 0.0):
        eng = load_cpu(path, schedule="direct", cache_fraction=0.25, cpu_share=share)
        eng.generate_ids(PROMPT, max_new_tokens=8)
        direct = eng.experts.direct
        direct.after_step(eng.experts.step - 1)  # count the last token's routing too
        s = eng.stats()
        # the prefill's units go through the fetch path; decode misses are the direct ones
        assert s["cpu_share_units"] == (direct.misses if share == 1.0 else 0), share
        # what the GPU read in place: the misses the CPU did not take
        assert s["zero_copy_bytes"] == (0 if share == 1.0 else direct.misses * s["unit_bytes"]), share
        eng.close()


def test_cpu_share_with_groups_and_quantized_units(checkpoints):
    path = checkpoints["qwen3moe-headdim"]
    for kw in (dict(groups=2), dict(expert_dtype="int8", quant_cache=False), dict(expert_dtype="int4")):
        # int4 needs a hidden size its groups divide: the embedded default model
        loader = (lambda **k: edgeprism.load(device="cpu", dtype="fp32", **k)) if "int4" in kw.values() else \
            (lambda **k: load_cpu(path, **k))
        ref = loader(schedule="direct", cache_fraction=0.25, **kw)
        want = ref.generate_ids(PROMPT, max_new_tokens=12)
        ref.close()
        eng = loader(schedule="direct", cache_fraction=0.25, cpu_share=0.5, **kw)
        assert eng.generate_ids(PROMPT, max_new_tokens=12) == want, kw
        assert eng.stats()["cpu_share_units"] > 0, kw
        eng.close()


def test_adaptive_share_climbs_towards_faster_steps(checkpoints):
    """From 0.5: measures the neighbours, moves to a faster one, stays where both neighbours are
    slower (re-measuring them once they are stale), moves again when the current share gets slow,
    turns at the ends, reaches 0 when that is faster, and ignores steps far longer than the last median."""
    from edgeprism.schedule import cpu_share as cs

    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25, cpu_share=True)
    share = eng.experts.direct.cpu_share
    assert share.frac_value == 0.5

    def window(seconds):
        for _ in range(cs.ADAPT_WINDOW):
            share.observe_step(seconds)

    window(1.0)
    assert share.frac_value == pytest.approx(0.6)  # nothing measured around: up first
    window(0.9)
    assert share.frac_value == pytest.approx(0.7)  # 0.5 was slower, 0.7 unmeasured
    window(0.8)
    assert share.frac_value == pytest.approx(0.8)
    window(0.85)
    assert share.frac_value == pytest.approx(0.7)  # 0.7 measured faster: back
    for _ in range(cs.ADAPT_STALE - 3):
        window(0.8)
        assert share.frac_value == pytest.approx(0.7)  # both neighbours slower: stays
    window(0.8)
    assert share.frac_value == pytest.approx(0.6)  # 0.6's figure went stale: measured again
    window(0.9)
    assert share.frac_value == pytest.approx(0.7)  # still slower: back to the best
    window(2.0)
    assert share.frac_value == pytest.approx(0.6)  # 0.7 got slow: the fastest fresh neighbour
    share.observe_step(100.0)  # a prefill in between: left out
    assert share._window == []
    assert float(share.frac) == pytest.approx(share.frac_value)
    share.set_frac(1.0)
    share._seen.clear()
    window(0.99)
    assert share.frac_value == pytest.approx(0.9)  # at 1: the only neighbour
    # steps that get faster all the way down reach 0, where the graphs without the share run
    for t in (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3):
        window(t)
    assert share.frac_value == 0.0 and not eng.decode_step.sharing
    window(0.3)
    assert share.frac_value == 0.0  # 0.1 was slower: stays at 0
    eng.close()


def test_adaptive_share_judges_a_window_by_its_mean_without_the_slowest_step(checkpoints):
    """A share whose median step is faster but whose steps are often slow loses to a steady one (the
    search minimises the mean step, i.e. maximises throughput); one pause in a window does not
    decide; the path of measured shares is reported and reset with the stats."""
    from edgeprism.schedule import cpu_share as cs

    assert cs.ADAPT_WINDOW == 8
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25, cpu_share=True)
    share = eng.experts.direct.cpu_share

    def window(times):
        for t in times:
            share.observe_step(t)

    window([1.0] * 8)  # 0.5: steady at 1.0
    assert share.frac_value == pytest.approx(0.6)
    window([0.9] * 5 + [1.6] * 3)  # 0.6: median 0.9, but 3 of 8 steps slow: mean 1.16 without the slowest
    assert share.frac_value == pytest.approx(0.5)  # 0.6 was slower: back to 0.5
    window([1.0] * 7 + [2.9])  # one pause (under the 3x cut) is dropped with the slowest step
    assert share._seen[0.5][0] == pytest.approx(1.0)
    assert share.frac_value == pytest.approx(0.4)  # 0.4 not measured yet: measured next
    window([1.05] * 8)  # 0.4: slower than 0.5
    assert share.frac_value == pytest.approx(0.5)  # back to the steady best
    assert share.summary(1)["cpu_share_path"] == [0.5, 0.6, 0.5, 0.4]
    share.reset_stats()
    assert share.summary(1)["cpu_share_path"] == []
    for _ in range(cs.PATH_WINDOWS + 3):  # a long-lived engine keeps only the latest windows
        window([1.0] * 8)
    assert len(share.summary(1)["cpu_share_path"]) == cs.PATH_WINDOWS
    eng.close()


def test_adaptive_share_decodes_the_same_tokens_at_every_frac(checkpoints, direct_ref):
    """Across the climb the step switches between graphs with and without the share (frac 0)."""
    from edgeprism.schedule import cpu_share as cs

    ref_logits, ref_tokens = direct_ref["olmoe"]
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25, cpu_share=True)
    share = eng.experts.direct.cpu_share
    for frac in (0.0, 0.3, 1.0, 0.0):
        share.set_frac(frac)
        share.adaptive = False  # hold it here for this request
        assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens, frac
        assert eng.decode_step.sharing == (frac > 0)
    assert (False, True) in eng.decode_step._steps and (False, False) in eng.decode_step._steps
    assert cs.ADAPT_STEP > 0
    eng.close()


def test_latency_target_holds_the_adaptive_share(checkpoints, direct_ref):
    """With latency_ms the floor controller is the one loop on step time: the share's search holds."""
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25, cpu_share=True)
    share = eng.experts.direct.cpu_share
    eng.generate_ids(PROMPT, max_new_tokens=40, latency_ms=1e6)
    assert share.frac_value == 0.5 and share._window == [] and not share.held  # nothing measured: stays
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == direct_ref["olmoe"][1]
    # once the search has measured shares, a latency target holds the fastest of those still fresh
    share._seen.clear()
    share._windows = 20
    share._seen.update({0.3: (0.8, 19), 0.4: (0.9, 20), 0.7: (0.5, 2)})  # 0.7 was fastest, long ago: stale
    eng.generate_ids(PROMPT, max_new_tokens=4, latency_ms=1e6)
    assert share.frac_value == pytest.approx(0.3) and not share.held
    eng.close()


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", [0.5]])
def test_cpu_share_rejects_bad_values(checkpoints, bad):
    with pytest.raises(ConfigError, match="cpu_share"):
        load_cpu(checkpoints["olmoe"], schedule="direct", cpu_share=bad)


def test_cpu_share_needs_direct(checkpoints):
    with pytest.raises(ConfigError, match="schedule='direct'"):
        load_cpu(checkpoints["olmoe"], schedule="hybrid", cpu_share=0.5)


def test_cpu_share_off_values(checkpoints):
    for off in (None, False):
        eng = load_cpu(checkpoints["olmoe"], schedule="direct", cpu_share=off)
        assert eng.experts.direct.cpu_share is None and "cpu_share" not in eng.stats()
        eng.close()


# ----- the protocol alone: nothing plays the other side -----

def bare_share(timeout_s: float, top_k: int = 2) -> CpuShare:
    """A CPU share over a two-layer host store of small bf16 units (8 experts), on the CPU."""
    from edgeprism.cache.host_store import HostStore

    fmt = make_format("bf16", 64, 32, torch.float32)
    store = HostStore([0, 1], 8, 1, 64, 32, torch.float32, pin=False, fmt=fmt)
    return CpuShare(store, fmt, top_k=top_k, device=torch.device("cpu"), frac=1.0, timeout_s=timeout_s)


def test_loop_gives_up_when_the_gpu_never_publishes():
    """No flag ever arrives: the loop returns after its timeout and `finish` raises a typed error."""
    share = bare_share(timeout_s=0.2)
    share.begin()
    with pytest.raises(DecodeSyncError, match="gave up waiting for the GPU"):
        share.finish()
    share.close()


def test_loop_stops_at_once_when_aborted():
    share = bare_share(timeout_s=30.0)
    share.begin()
    done = threading.Event()
    share._running.add_done_callback(lambda _: done.set())
    share.abort()  # returns without raising: the failed run's caller has the error
    assert done.is_set() and share._running is None
    share.close()


def test_merge_gives_up_when_the_cpu_never_answers():
    """The GPU side (here: Python) stops polling after the timeout and the next `finish` raises."""
    share = bare_share(timeout_s=0.1)
    share.seq_dev.fill_(7)  # no loop running for seq 7
    y = share.merge(0, torch.zeros(1, 64))
    assert y.shape == (1, 64) and int(share.status) == 1
    share._running = _done(2)  # a loop that computed 2 units
    with pytest.raises(DecodeSyncError, match="GPU gave up"):
        share.finish()
    share.close()


def _done(n):
    from concurrent.futures import Future

    f = Future()
    f.set_result(n)
    return f


def test_cli_cpu_share_option():
    """`--cpu-share auto|FRACTION` reaches load(); a bad value is a clean usage error."""
    import subprocess
    import sys

    from edgeprism.cli import _cpu_share

    assert _cpu_share("auto") is True and _cpu_share("0.4") == 0.4
    res = subprocess.run([sys.executable, "-m", "edgeprism.cli", "generate", "hi", "--cpu-share", "2"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "[0, 1]" in res.stderr and "Traceback" not in res.stderr
    out = subprocess.run([sys.executable, "-m", "edgeprism.cli", "generate", "The", "--device", "cpu", "--schedule",
                          "direct", "--cpu-share", "auto", "--max-new-tokens", "4", "--stats", "--vram-gb", "0.14"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-800:]
    assert "cpu_share_units" in out.stderr


def test_split_hands_the_cpu_the_first_misses_and_publishes_the_record():
    """`split` (host tensors): the first ⌊frac · misses⌋ misses go to the CPU, in assignment order; the
    record holds x, then (row, weight) per assignment (0 where not the CPU's); the flag holds the seq."""
    share = bare_share(timeout_s=1.0, top_k=4)
    share.set_frac(0.5)
    share.seq_dev.fill_(3)
    x = torch.randn(1, 64)
    slots = torch.tensor([5, -1, -1, 2])  # assignments 1 and 2 miss
    rows = torch.tensor([10, 11, 12, 13])
    w = torch.tensor([0.4, 0.3, 0.2, 0.1])
    w_gpu = share.split(1, x, slots, rows, w)  # layer 1 is the store's second MoE layer
    assert w_gpu.tolist() == pytest.approx([0.4, 0.0, 0.2, 0.1])  # ⌊0.5 · 2⌋ = 1: the first miss
    rec = share.pub[1]
    torch.testing.assert_close(rec[:64], x[0])
    torch.testing.assert_close(rec[64:].view(4, 2), torch.tensor([[10, 0], [11, 0.3], [12, 0], [13, 0]]))
    assert int(share.gpu_flag[1]) == 3 and int(share.gpu_flag[0]) == 0
    share.set_frac(1.0)
    w_gpu = share.split(1, x, slots, rows, torch.tensor([0.4, 0.0, 0.2, 0.1]))  # a dropped miss is no miss
    assert w_gpu.tolist() == pytest.approx([0.4, 0.0, 0.0, 0.1])
    assert share.pub[1][64:].view(4, 2)[:, 1].tolist() == pytest.approx([0, 0, 0.2, 0])
    share.close()


@pytest.mark.parametrize("optimum", [0.0, 0.3, 0.7, 1.0])
def test_adaptive_share_settles_near_the_fastest_share_on_a_simulated_machine(checkpoints, optimum):
    """A simulated step time with its minimum at `optimum` (where the CPU's and the GPU's parts balance)
    and ±2% noise: after 40 windows the search spends its last 10 windows within 0.2 of the optimum,
    and most of them (≥ 7) within 0.1."""
    from edgeprism.schedule import cpu_share as cs

    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25, cpu_share=True)
    share = eng.experts.direct.cpu_share
    gen = torch.Generator().manual_seed(int(optimum * 10))

    def step_time(frac):  # the further from the balance point, the slower the step (whichever side waits)
        return (10.0 + 8.0 * abs(frac - optimum)) * (1.0 + 0.02 * (2 * float(torch.rand((), generator=gen)) - 1))

    visited = []
    for _ in range(40):
        for _ in range(cs.ADAPT_WINDOW):
            share.observe_step(step_time(share.frac_value))
        visited.append(share.frac_value)
    late = visited[-10:]
    assert all(abs(f - optimum) <= 0.2 + 1e-9 for f in late), (optimum, visited)
    assert sum(abs(f - optimum) <= 0.1 + 1e-9 for f in late) >= 7, (optimum, visited)
    eng.close()


def test_int8_activations_keep_the_default_models_perplexity(monkeypatch):
    """int4 experts, every miss computed by the CPU share: teacher-forced decode perplexity of the
    trained default model on held-out text with the CPU's int8 activations is within 1% of exact fp32
    activations (and of no CPU share at all)."""
    import math

    from edgeprism.corpus import token_stream

    def decode_ppl(act: str | None, share: float | None) -> float:
        if act:
            monkeypatch.setenv("EDGEPRISM_CPU_INT4_ACT", act)
        eng = edgeprism.load(device="cpu", dtype="fp32", expert_dtype="int4", schedule="direct", cache_fraction=0.25,
                             cpu_share=share)
        ids = token_stream(eng.tokenizer, 161, 0)
        nll = 0.0
        with eng._lock, torch.inference_mode():
            logits = eng._run(ids[:32], 0, last_only=True)
            for i in range(32, len(ids)):  # one decode step a token, each through the CPU share
                nll += torch.nn.functional.cross_entropy(logits.float().view(1, -1), torch.tensor([ids[i]])).item()
                logits = eng._run([ids[i]], i, last_only=True)
        units = eng.stats().get("cpu_share_units", 0)
        eng.close()
        assert share is None or units > 0
        return math.exp(nll / (len(ids) - 32))

    gpu_path, exact, int8 = decode_ppl(None, None), decode_ppl("fp32", 1.0), decode_ppl("int8", 1.0)
    report = f"no share {gpu_path:.4f}, fp32 activations {exact:.4f}, int8 activations {int8:.4f}"
    print(report)
    assert abs(int8 / exact - 1) < 0.01 and abs(int8 / gpu_path - 1) < 0.01, report


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_the_loops_barrier_holds_every_thread_until_all_arrive(threads):
    """The spinning barrier between the loop's phases, on its own: 20000 rounds, also with more
    threads than cores (a waiter then yields). Made a no-op, it fails this check."""
    assert native.load().swiglu_barrier_check(threads, 20000) == 0


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("name", ["olmoe", "mixtral-gqa"])
def test_a_team_of_threads_matches_direct_decode(checkpoints, direct_ref, name, threads):
    """The loop's team (its own spinning barriers between phases) with several threads, also more
    threads than this machine's cores: the same logits and tokens as without a share, twice over."""
    ref_logits, ref_tokens = direct_ref[name]
    eng = load_cpu(checkpoints[name], schedule="direct", cache_fraction=0.25, cpu_share=1.0, cpu_threads=threads)
    assert eng.experts.direct.cpu_share.threads == threads
    for _ in range(2):
        torch.testing.assert_close(decode_logits(eng), ref_logits, rtol=1e-4, atol=1e-4)
        assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens
    assert eng.stats()["cpu_share_units"] > 0
    eng.close()


def test_loop_reports_its_phases(checkpoints):
    """The CPU loop's compute, split by phase: each phase is timed, they add up to no more than the
    loop's busy time, and reset_stats clears them."""
    from edgeprism.schedule.cpu_share import PHASES

    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25, cpu_share=1.0)
    eng.generate_ids(PROMPT, max_new_tokens=8)
    s = eng.stats()
    phases = s["cpu_share_phase_s"]
    assert s["cpu_share_units"] > 0 and list(phases) == list(PHASES)
    assert phases["gate_up"] > 0 and phases["down"] > 0 and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= s["cpu_share_busy_s"] * 1.01 + 1e-4
    eng.reset_stats()
    assert all(v == 0 for v in eng.stats()["cpu_share_phase_s"].values())
    eng.close()
