"""The cost model: formulas, validation, and calibration cached on disk (tiny units, CPU "device")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgeprism.errors import InputError
from edgeprism.moe.quant import make_format
from edgeprism.schedule import cost as costmod
from edgeprism.schedule.cost import (
    CostModel,
    cache_path,
    load_or_calibrate,
    machine_key,
)

torch.set_num_threads(1)
MiB = 1 << 20


def model(**kw: object) -> CostModel:
    args = {"unit_bytes": 4 * MiB, "h2d_latency_s": 10e-6, "h2d_sizes": (256 * 1024, MiB, 4 * MiB, 16 * MiB),
                "h2d_bytes_per_s": (18.8e9, 36.6e9, 48.8e9, 53e9), "cpu_call_s": 50e-6, "cpu_bytes_per_s": 80e9,
                "gpu_call_s": 10e-6, "gpu_unit_s": 2e-6}
    args.update(kw)
    return CostModel(**args)  # type: ignore[arg-type]


def test_formulas() -> None:
    m = model()
    assert m.h2d_bandwidth(MiB) == 36.6e9 and m.h2d_bandwidth(1024) == 18.8e9 and m.h2d_bandwidth(1 << 30) == 53e9
    assert 36.6e9 < m.h2d_bandwidth(2 * MiB) < 48.8e9
    assert m.h2d_bandwidth(2 * MiB) == pytest.approx((36.6e9 + 48.8e9) / 2)  # halfway in log size
    assert m.h2d_seconds(4 * MiB) == pytest.approx(10e-6 + 4 * MiB / 48.8e9) == m.copy_unit_s
    assert m.h2d_seconds(0) == 0.0
    sizes = [2**k for k in range(10, 30)]
    times = [m.h2d_seconds(n) for n in sizes]
    assert times == sorted(times)  # a bigger copy never takes less time
    assert m.cpu_seconds(0) == 0.0 and m.cpu_seconds(3) == pytest.approx(50e-6 + 3 * 4 * MiB / 80e9)
    assert m.gpu_seconds(0) == 0.0 and m.gpu_seconds(8) == pytest.approx(26e-6)


@pytest.mark.parametrize("bad", [{"unit_bytes": 0}, {"h2d_sizes": (2, 1), "h2d_bytes_per_s": (1.0, 1.0)},
                                 {"h2d_sizes": (), "h2d_bytes_per_s": ()}, {"cpu_bytes_per_s": 0.0},
                                 {"cpu_bytes_per_s": float("inf")},
                                 {"h2d_latency_s": -1.0}, {"gpu_unit_s": float("nan")}])
def test_bad_models_raise(bad: dict) -> None:
    with pytest.raises(InputError):
        model(**bad)


def test_bad_sizes_raise() -> None:
    with pytest.raises(InputError):
        model().h2d_seconds(-1)
    with pytest.raises(InputError):
        model().cpu_seconds(-1)


def test_json_round_trip() -> None:
    m = model(machine={"host": "x"})
    assert CostModel.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_calibrate_caches_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = make_format(None, 32, 8, torch.float32)
    arenas = [torch.randn(6, fmt.row_numel) for _ in range(2)]
    calls = []
    real = costmod.calibrate

    def counting(*args: object, **kw: object) -> CostModel:
        calls.append(1)
        return real(*args, reps=2, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(costmod, "calibrate", counting)
    m = load_or_calibrate(fmt, arenas, "cpu", threads=1, cache_dir=tmp_path)
    assert m.unit_bytes == fmt.unit_bytes and m.cpu_bytes_per_s > 0 and all(r > 0 for r in m.h2d_bytes_per_s)
    path = cache_path(machine_key(fmt, "cpu", 1), tmp_path)
    assert path.exists() and json.loads(path.read_text())["machine"]["torch"] == torch.__version__
    assert load_or_calibrate(fmt, arenas, "cpu", threads=1, cache_dir=tmp_path) == m and len(calls) == 1
    load_or_calibrate(fmt, arenas, "cpu", threads=1, cache_dir=tmp_path, recalibrate=True)
    assert len(calls) == 2
    path.write_text("{not json")
    load_or_calibrate(fmt, arenas, "cpu", threads=1, cache_dir=tmp_path)
    assert len(calls) == 3 and CostModel.from_json(json.loads(path.read_text())).unit_bytes == fmt.unit_bytes
    # another format is another machine key: measured separately
    other = make_format("int8", 32, 8, torch.float32)
    assert cache_path(machine_key(other, "cpu", 1), tmp_path) != path


def test_for_store(tmp_path: Path) -> None:
    from edgeprism.cache.host_store import HostStore
    from edgeprism.schedule import for_store

    store = HostStore([0, 1], 4, 2, 32, 16, torch.float32, pin=False)
    for arena in store.arenas.values():
        arena.normal_()
    m = for_store(store, "cpu", threads=1, cache_dir=tmp_path)
    assert m.unit_bytes == store.unit_bytes and m.machine["format"] == "fp32"


def test_calibrate_needs_rows() -> None:
    fmt = make_format(None, 32, 8, torch.float32)
    with pytest.raises(InputError):
        costmod.calibrate(fmt, [torch.randn(1, fmt.row_numel)], "cpu", threads=1)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEPRISM_CACHE_DIR", str(tmp_path))
    assert costmod.default_cache_dir() == tmp_path / "cost"
    monkeypatch.delenv("EDGEPRISM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert costmod.default_cache_dir() == tmp_path / "xdg" / "edgeprism" / "cost"
