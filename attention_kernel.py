"""The compiled CPU kernels, built on first use: the fused local cross-attention (csrc/l2_attention.cpp,
csrc/paired_groups.cpp) and the MSB loss of both subnetworks (csrc/msb_loss.cpp).

torch's C++ extension loader compiles them once per machine into ~/.cache/torch_extensions (about a minute;
later processes load the cached library in a second). Without a C++ compiler, or with
M2HSE_ATTENTION_KERNEL=0, the local subnetwork uses its tensor-op path and the loss its tensor ops: the same
formulas (equal to 1e-12 in float64, tests/test_attention_kernel.py), slower.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("l2_attention.cpp", "paired_groups.cpp",
                                                                          "msb_loss.cpp")]
# -march=native: the cached library is built for this CPU, so its name carries the CPU's identity below
# (torch's loader itself rebuilds it when the source or the flags change).
# -fno-math-errno / -fno-trapping-math: exp and the branches of the leaky ReLU and clamps vectorise (also on
# AVX2-only CPUs); neither changes an IEEE result.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
# -fopenmp (compiling only, not linking): at::parallel_for spreads the context items over torch's threads, its
# calls served by the OpenMP runtime torch has already loaded (a second runtime would bring a second thread
# pool). Where torch's runtime does not serve them, the kernel is built again for one thread.
THREADED, ONE_THREAD = "-fopenmp", "-fopenmp-simd"
_state: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """False when the user turned the kernel off with M2HSE_ATTENTION_KERNEL=0."""
    return os.environ.get("M2HSE_ATTENTION_KERNEL", "1") != "0"


def _cpu_identity() -> str:
    """A short hash of the CPU model and instruction-set flags (a library built with -march=native runs only there)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    text = "\n".join([platform.machine(), platform.processor(), *lines])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load() -> ModuleType | None:
    """The compiled kernel, or None (and one warning on stderr) when it cannot be built here."""
    if "module" not in _state:
        _state["module"] = _build() if enabled() else None
    return _state["module"]


def _compile(threads_flag: str, suffix: str = "") -> ModuleType:
    from torch.utils import cpp_extension
    return cpp_extension.load(name=f"m2hse_l2_attention_{_cpu_identity()}{suffix}",
                              sources=[str(source) for source in SOURCES], extra_cflags=[*CFLAGS, threads_flag],
                              extra_ldflags=["-lmvec"], verbose=False)


def _compile_for_torch_threads() -> ModuleType:
    try:
        return _compile(THREADED)
    except ImportError as error:  # e.g. "undefined symbol: GOMP_parallel": no GNU OpenMP loaded by torch
        if "undefined symbol" not in str(error):
            raise
        return _compile(ONE_THREAD, "_one_thread")


def _build() -> ModuleType | None:
    try:
        return _compile_for_torch_threads()
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"note: the fused attention kernel could not be built ({first_line}); the local subnetwork "
              f"uses its slower tensor-op path (same formula)", file=sys.stderr)
        return None
