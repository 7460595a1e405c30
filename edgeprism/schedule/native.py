"""Build and load the small C kernel of the CPU expert path (`_swiglu_rows.c`), if a C compiler exists.

Plain C loaded with ctypes, not a torch extension: it needs no torch headers, so it builds in about
a second (a `load_inline` extension takes a minute), and ctypes releases the GIL during the call, so
it runs in parallel with the thread that drives the GPU. Compiled with `-march=native` for the
machine it runs on, into `<cache>/edgeprism/kernels/` keyed by source, flags, host and CPU. Without a
compiler (or if the build fails, or with `EDGEPRISM_NO_NATIVE=1`) `load()` returns None and the torch
path is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from edgeprism.errors import InputError
from edgeprism.schedule.cost import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_swiglu_rows.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast")


def flags() -> tuple[str, ...]:
    """Compiler flags: `-march=native` unless `EDGEPRISM_NATIVE_ARCH` names another target (e.g.
    x86-64, to build the portable loops without AVX2 — how the tests cover that path)."""
    return (*FLAGS, f"-march={os.environ.get('EDGEPRISM_NATIVE_ARCH') or 'native'}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path() -> Path:
    key = "\n".join((SOURCE.read_text(), " ".join(flags()), platform.node(), _cpu_model()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir().parent / "kernels" / f"swiglu_rows-{digest}.so"


DEFAULT_CHUNK = 16


def loop_chunk() -> int:
    """Iterations a thread takes at a time in the kernel's loops: `EDGEPRISM_NATIVE_CHUNK`, default 16
    (dynamic: a preempted thread holds up one chunk, not its whole share); 0 = static stretches."""
    raw = os.environ.get("EDGEPRISM_NATIVE_CHUNK")
    try:
        chunk = DEFAULT_CHUNK if raw in (None, "") else int(raw)
    except ValueError:
        chunk = -1
    if chunk < 0:
        raise InputError(f"EDGEPRISM_NATIVE_CHUNK must be a whole number ≥ 0 (0 = static), got {raw!r}")
    return chunk


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel (built at first use), or None where it cannot be built."""
    if os.environ.get("EDGEPRISM_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the CPU expert path uses torch ops")
        return None
    path = _library_path()
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.so")
            subprocess.run([cc, *flags(), str(SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                           timeout=120)
            tmp.replace(path)  # atomic: concurrent builders (pytest-xdist) never load half a file
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("building the CPU expert kernel failed (%s %s); using torch ops", e, detail.decode()[-500:])
        return None
    lib.swiglu_rows.restype = None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.swiglu_rows.argtypes = [ptr, i32, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i32, i32, i32, i32, ptr, ptr,
                                ptr, i32]
    lib.swiglu_rows_work.restype = i64
    lib.swiglu_rows_work.argtypes = [i32, i32, i32, i32, i32]
    lib.swiglu_barrier_check.restype = i64
    lib.swiglu_barrier_check.argtypes = [i32, i32]
    lib.swiglu_set_chunk.restype = None
    lib.swiglu_set_chunk.argtypes = [i32]
    lib.swiglu_set_chunk(loop_chunk())
    lib.swiglu_token_loop.restype = i64
    lib.swiglu_token_loop.argtypes = [ptr, ptr, i32, i32, ptr, i64, i32, ptr, ptr, i32, i64, i64, i64, i64, i64, i64,
                                      i64, i32, i32, i32, ptr, ptr, ptr, i32, i64, ptr, ptr, ptr]
    return lib
