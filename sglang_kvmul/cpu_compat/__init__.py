"""CPU-only compatibility code for running SGLang 0.5.23 without a GPU. Nothing here runs on CUDA.

Why each piece exists (measured on a 2-core CPU machine, see the project's CPU notes):
  * `stubs/sgl_kernel`: with `SGLANG_USE_CPU_ENGINE=1`, SGLang imports the sgl-kernel *CPU* build,
    which is not on PyPI. The stand-in registers no torch op, so SGLang takes its native-torch paths.
  * `fix_torchvision`: PyPI's torchvision is CUDA-linked; two unconditional `register_fake` calls
    then fail at import. Applied once at setup time.
  * `cpu_env()`: the environment SGLang needs on CPU (CPU engine, one core group per scheduler).
  * `attention.install()`: SGLang 0.5.23's torch-native attention backend lacks the
    `get_cpu_graph_seq_len_fill_value` that attention DP calls when it pads a batch for the MLP
    sync (the Intel AMX backend returns 1); installed in every process by the plugin on CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

STUBS_DIR = Path(__file__).parent / "stubs"


def real_sgl_kernel_available() -> bool:
    spec = importlib.util.find_spec("sgl_kernel")
    return spec is not None and spec.origin is not None and Path(spec.origin).parent.parent != STUBS_DIR


def omp_threads_bind(processes: int, num_cpus: int) -> str:
    """`SGLANG_CPU_OMP_THREADS_BIND`: split the cores into one contiguous group per scheduler process
    (SGLang wants one group per TP x PP x DP rank; with attention DP the DP ranks share the TP group)."""
    groups = []
    for r in range(processes):
        lo = r * num_cpus // processes
        hi = max(lo, (r + 1) * num_cpus // processes - 1)
        lo, hi = lo % num_cpus, hi % num_cpus
        groups.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return "|".join(groups)


def cpu_env(processes: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables to add for a CPU server (existing values win)."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, str] = {}
    if "SGLANG_USE_CPU_ENGINE" not in environ:
        out["SGLANG_USE_CPU_ENGINE"] = "1"
    if "SGLANG_CPU_OMP_THREADS_BIND" not in environ:
        out["SGLANG_CPU_OMP_THREADS_BIND"] = omp_threads_bind(processes, os.cpu_count() or 1)
    out.setdefault("HF_HUB_OFFLINE", environ.get("HF_HUB_OFFLINE", "1"))
    if not real_sgl_kernel_available():
        parts = [str(STUBS_DIR)] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        out["PYTHONPATH"] = os.pathsep.join(parts)
    return out
