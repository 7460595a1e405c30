"""The CPU expert path equals the GPU path's math (`moe/kernels.grouped_swiglu`) on host-arena rows."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from edgeprism.cache.host_store import HostStore
from edgeprism.errors import InputError
from edgeprism.moe.kernels import grouped_swiglu
from edgeprism.moe.quant import Int4Format, make_format
from edgeprism.schedule import native
from edgeprism.schedule.cpu_experts import CpuExperts, default_threads, runs

torch.set_num_threads(1)
D, I, E = 64, 48, 8
IMPLS = [pytest.param("native", marks=pytest.mark.skipif(native.load() is None, reason="native kernel unavailable")),
         "torch", "unit"]
ROWS = {1: [[4]], 3: [[0, 1, 2], [5, 1, 3]], 8: [[0, 1, 2, 3, 4, 5, 6, 7], [7, 2, 3, 5, 0, 4, 6, 1],
                                                [15, 2, 3, 9, 0, 12, 6, 1]]}  # runs, any order, far rows


def store(dtype: torch.dtype, groups: int, expert_dtype: str | None = None, dim: int = D, inter: int = I) -> HostStore:
    fmt = make_format(expert_dtype, dim, inter // groups, dtype)
    s = HostStore([0], E, groups, dim, inter, dtype, pin=False, fmt=fmt)
    g = torch.Generator().manual_seed(groups)
    for e in range(E):
        w1, w3 = (torch.randn(inter, dim, generator=g) * 0.2 for _ in range(2))
        s.fill_expert(0, e, w1, w3, torch.randn(dim, inter, generator=g) * 0.2)
    return s


def reference(s: HostStore, x: torch.Tensor, rows: list[int], weights: torch.Tensor) -> torch.Tensor:
    idx = torch.tensor(rows)
    w13, w2 = s.format.dequantize(s.format.parts(s.arenas[0]), idx)
    return grouped_swiglu(x, w13, w2, torch.arange(len(rows)), torch.zeros(len(rows), dtype=torch.long), weights)


def tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    return (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_equals_gpu_path(impl: str, dtype: torch.dtype, groups: int, count: int) -> None:
    s = store(dtype, groups)
    path = CpuExperts(s.format, threads=1, impl=impl)
    x = torch.randn(1, D).to(dtype)
    for rows in ROWS[count]:
        if max(rows) >= E * groups:
            continue
        weights = torch.rand(len(rows))
        ref = reference(s, x, rows, weights)
        y = path(x, s.arenas[0], rows, weights)
        assert y.shape == (1, D) and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref.float(), atol=tolerance(dtype, ref), rtol=0)


def test_all_groups_reproduce_the_expert() -> None:
    s1, s2 = store(torch.float32, 1), store(torch.float32, 2)
    s2.arenas[0].copy_(_regroup(s1, 2))
    x, w = torch.randn(1, D), torch.tensor([0.7])
    whole = CpuExperts(s1.format, 1)(x, s1.arenas[0], [3], w)
    split = CpuExperts(s2.format, 1)(x, s2.arenas[0], [6, 7], torch.tensor([0.7, 0.7]))
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def _regroup(s: HostStore, groups: int) -> torch.Tensor:
    """s's experts (G = 1) re-cut into `groups` units each, as HostStore.fill_expert lays them out."""
    out = HostStore([0], E, groups, D, I, torch.float32, pin=False)
    parts = s.format.parts(s.arenas[0])
    for e in range(E):
        w1, w3 = parts.w13[e].chunk(2)
        out.fill_expert(0, e, w1, w3, parts.w2[e])
    return out.arenas[0]


@pytest.mark.parametrize("impl", IMPLS[:2])  # native, or the format's own cpu_grouped
@pytest.mark.parametrize("expert_dtype", ["int8", "int4", "bf16"])  # quantized rows; bf16 rows computed in fp32
def test_stored_formats(impl: str, expert_dtype: str) -> None:
    s = store(torch.float32, 2, expert_dtype, dim=128, inter=256)  # int4: groups of 64 or more divide D and Ig
    path = CpuExperts(s.format, threads=1, impl=impl, int4_act="fp32")  # exact inputs; int8 ones: below
    assert path.impl == ("native" if impl == "native" else "format")
    x, rows, w = torch.randn(1, 128), [1, 2, 9, 15], torch.rand(4)
    ref = reference(s, x, rows, w)
    torch.testing.assert_close(path(x, s.arenas[0], rows, w), ref, atol=1e-4, rtol=1e-4)


NATIVE = pytest.mark.skipif(native.load() is None, reason="native kernel unavailable")


def quantize_q8(v: torch.Tensor) -> torch.Tensor:
    """v with each chunk of 64 inputs (the kernel's chunks: the 32 bytes of a row that hold them)
    quantized to int8 against the chunk's max |v| / 127 and dequantized, rounding as the kernel does."""
    n = v.shape[-1]
    b = v.reshape(*v.shape[:-1], n // 64, 64)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d).reshape(v.shape)


def reference_q8(s: HostStore, x: torch.Tensor, rows: list[int], weights: torch.Tensor) -> torch.Tensor:
    """What int4 rows with int8 activations compute: the dequantized rows against quantized x, and
    against each unit's quantized activation (in float64, so only the kernel's own rounding differs)."""
    w13, w2 = s.format.dequantize(s.format.parts(s.arenas[0]), torch.tensor(rows))
    h = torch.einsum("nkd,d->nk", w13.double(), quantize_q8(x.float())[0].double()).float()
    g, u = h.chunk(2, dim=1)
    act = weights[:, None].float() * F.silu(g) * u
    return torch.einsum("ndj,nj->d", w2.double(), quantize_q8(act).double()).float()[None]


@NATIVE
@pytest.mark.parametrize("expert_dtype", ["int4-g128", "int4-g64"])
@pytest.mark.parametrize("rows", [[5], [0, 1, 2], [13, 2, 7, 8, 9], [15, 0, 11, 4, 3, 12, 6]])  # odd subsets
@pytest.mark.parametrize("x_bf16", [False, True])
@pytest.mark.parametrize("act", ["fp32", "int8"])
@pytest.mark.parametrize("shape", [(256, 256), (384, 768)])
def test_native_int4_equals_the_formats_reference(expert_dtype: str, rows: list[int], x_bf16: bool, act: str,
                                                  shape: tuple[int, int]) -> None:
    """Packed nibbles, fp16 scales and minimums read in place = dequantize, then fp32 matmul; also with
    x exactly bf16, as a bf16 model's activations are. With int8 activations: the same against the
    quantized inputs (the integer dots are exact), and within 3% (relative norm) of the exact inputs'
    result — int4 weights themselves are ~9% off per weight (measured 1.0-1.3% here). Shapes: D 256 and
    Ig 128 (4 and 2 chunks of 64: the kernel's 4-chunk loop, and its tail alone); D 384 and Ig 384 (6
    chunks: both). Both group sizes divide D and Ig."""
    dim, inter = shape
    s = store(torch.float32, 2, expert_dtype, dim=dim, inter=inter)
    assert s.format.group_size == int(expert_dtype[-3:].lstrip("-g"))
    g = torch.Generator().manual_seed(len(rows))
    x, w = torch.randn(1, dim, generator=g), torch.rand(len(rows), generator=g) * 2 - 0.5  # some negative
    if x_bf16:
        x = x.bfloat16().float()
    ref = reference(s, x, rows, w)
    want = ref if act == "fp32" else reference_q8(s, x, rows, w)
    for threads in (1, 2, 3):
        path = CpuExperts(s.format, threads=threads, impl="native", int4_act=act)
        assert path.impl == "native" and path._layout.kind == (3 if act == "fp32" else 4)
        y = path(x, s.arenas[0], rows, w)
        torch.testing.assert_close(y, want, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)
        assert (y - ref).norm() <= (0.03 if act == "int8" else 1e-5) * ref.norm()


@NATIVE
def test_int4_activations_setting(monkeypatch) -> None:
    s = store(torch.float32, 2, "int4-g64", dim=256, inter=256)
    assert CpuExperts(s.format, threads=1)._layout.kind == 4  # int8 activations by default
    monkeypatch.setenv("EDGEPRISM_CPU_INT4_ACT", "fp32")
    assert CpuExperts(s.format, threads=1)._layout.kind == 3
    assert CpuExperts(s.format, threads=1, int4_act="int8")._layout.kind == 4  # the argument wins
    monkeypatch.setenv("EDGEPRISM_CPU_INT4_ACT", "int4")
    with pytest.raises(InputError, match="EDGEPRISM_CPU_INT4_ACT"):
        CpuExperts(s.format, threads=1)
    # groups of 32 inputs cannot feed 32-wide int8 blocks of one parity: exact inputs
    monkeypatch.delenv("EDGEPRISM_CPU_INT4_ACT")
    assert CpuExperts(Int4Format(256, 128, torch.float32, 32), threads=1)._layout.kind == 3


@NATIVE
@pytest.mark.parametrize("act", ["fp32", "int8"])
def test_native_int4_reads_its_rows_in_compute_dtype_bf16(act: str) -> None:
    """bf16 rows' scales and bf16 x in, bf16 out: the reference within bf16's tolerance (with int8
    activations, the reference on the quantized inputs)."""
    s = store(torch.bfloat16, 2, "int4", dim=256, inter=256)
    path = CpuExperts(s.format, threads=2, int4_act=act)
    assert path.impl == "native"
    g = torch.Generator().manual_seed(3)
    x, rows, w = torch.randn(1, 256, generator=g).bfloat16(), [3, 9, 10], torch.rand(3, generator=g)
    ref = (reference if act == "fp32" else reference_q8)(s, x, rows, w)
    y = path(x, s.arenas[0], rows, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=tolerance(torch.bfloat16, ref), rtol=0)


@NATIVE
@pytest.mark.parametrize("expert_dtype", ["bf16", "int4"])
def test_native_is_deterministic_across_thread_counts(expert_dtype: str) -> None:
    s = store(torch.bfloat16, 2, expert_dtype, dim=128, inter=256)
    x, rows, w = torch.randn(1, 128).bfloat16(), [3, 4, 5, 11], torch.rand(4)
    one, three = (CpuExperts(s.format, threads=t, impl="native")(x, s.arenas[0], rows, w) for t in (1, 3))
    assert torch.equal(one, three)  # every output element is summed by one thread, in one order


@NATIVE
@pytest.mark.parametrize("expert_dtype", ["bf16", "int4", "int8"])
def test_native_results_do_not_depend_on_the_loop_schedule(expert_dtype: str) -> None:
    """Static stretches or dynamic chunks of any size: each output is still summed by one thread in
    one order, so the bits are the same."""
    s = store(torch.bfloat16, 2, expert_dtype, dim=128, inter=256)
    x, rows, w = torch.randn(1, 128).bfloat16(), [3, 4, 5, 11, 0], torch.rand(5)
    lib = native.load()
    outs = []
    try:
        for chunk in (0, 1, 7, 16, 1000):
            lib.swiglu_set_chunk(chunk)
            outs.append(CpuExperts(s.format, threads=3, impl="native")(x, s.arenas[0], rows, w))
    finally:
        lib.swiglu_set_chunk(native.loop_chunk())
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_loop_chunk_setting(monkeypatch) -> None:
    monkeypatch.delenv("EDGEPRISM_NATIVE_CHUNK", raising=False)
    assert native.loop_chunk() == native.DEFAULT_CHUNK
    monkeypatch.setenv("EDGEPRISM_NATIVE_CHUNK", "0")
    assert native.loop_chunk() == 0
    for bad in ("-1", "dynamic"):
        monkeypatch.setenv("EDGEPRISM_NATIVE_CHUNK", bad)
        with pytest.raises(InputError, match="EDGEPRISM_NATIVE_CHUNK"):
            native.loop_chunk()


def test_submit_runs_on_a_worker_thread() -> None:
    s = store(torch.float32, 1)
    path = CpuExperts(s.format, threads=1)
    x, w = torch.randn(1, D), torch.rand(2)
    try:
        torch.testing.assert_close(path.submit(x, s.arenas[0], [1, 4], w).result(), path(x, s.arenas[0], [1, 4], w))
    finally:
        path.close()


def test_runs_threads_and_bad_inputs() -> None:
    assert runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert default_threads() >= 1
    s = store(torch.float32, 1)
    with pytest.raises(InputError):
        CpuExperts(s.format, threads=0)
    with pytest.raises(InputError):
        CpuExperts(s.format, impl="gpu")
    path = CpuExperts(s.format, threads=1)
    with pytest.raises(InputError):
        path(torch.randn(2, D), s.arenas[0], [0], torch.ones(1))
    with pytest.raises(InputError):
        path(torch.randn(1, D), s.arenas[0], [0, 1], torch.ones(1))
    with pytest.raises(InputError):  # not this format's rows
        path(torch.randn(1, D), s.arenas[0].bfloat16(), [0], torch.ones(1))
    with pytest.raises(InputError):
        path(torch.randn(1, D), s.arenas[0][:, :-1], [0], torch.ones(1))
    assert path(torch.randn(1, D), s.arenas[0], [], torch.ones(0)).abs().sum() == 0
    if path.impl == "native":
        with pytest.raises(InputError):
            path(torch.randn(1, D), s.arenas[0], [E], torch.ones(1))


@NATIVE
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 baseline build")
def test_portable_loops_without_avx2(tmp_path) -> None:
    """The kernel built for the x86-64 baseline (no AVX2/F16C: the plain C loops other CPUs get)
    passes the same equality tests, in a fresh process with its own build."""
    env = {**os.environ, "EDGEPRISM_NATIVE_ARCH": "x86-64", "EDGEPRISM_CACHE_DIR": str(tmp_path)}
    tests = "native_int4_equals or stored_formats or equals_gpu_path"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                          __file__, "-k", f"({tests}) and not portable"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert list((tmp_path / "kernels").glob("swiglu_rows-*.so"))  # it really built its own library
