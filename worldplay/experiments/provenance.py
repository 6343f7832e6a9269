"""What a result records about where it came from: code, environment, machine, time.

The git state is read from the checkout that holds this package. Machines that get a copy of
the working tree without ``.git`` (the lent GPU machines) declare the commit instead
(``--source-commit``); the provenance then says ``"source": "declared"``.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Paths whose changes do not make the tree "dirty" for a run: published results of other runs.
DIRTY_EXCLUDES = ("experiments/results",)
# Environment variables recorded with their values: exact names of settings that can change a
# run's numbers or speed. An allow-list, because results are committed and published: a variable
# like WORLDPLAY_AUTH, TORCH_HUB_AUTH or NCCL_CREDENTIALS may hold a credential, and no list of
# suspicious words knows every spelling. Add a name here only if its value is never a secret.
RECORDED_ENV = frozenset({
    # device selection, allocator, launch behaviour
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_LAUNCH_BLOCKING", "CUDA_DEVICE_MAX_CONNECTIONS",
    "CUDA_MODULE_LOADING", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING",
    # the CUDA toolkit of the image
    "CUDA_HOME", "CUDA_VERSION", "TORCH_CUDA_ARCH_LIST",
    # math modes and library workspaces
    "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE",
    "TORCH_BLAS_PREFER_CUBLASLT", "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT", "TORCH_CUDNN_V8_API_DISABLED",
    # CPU threads
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    # torch.compile / inductor (a warm cache changes the compile time a bench reports)
    "TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE", "TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_MAX_AUTOTUNE",
    "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM", "TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE",
    "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "TORCHINDUCTOR_FREEZING", "TORCHINDUCTOR_COMPILE_THREADS",
    # multi-GPU collectives
    "NCCL_VERSION", "NCCL_NVLS_ENABLE", "NCCL_CUMEM_ENABLE", "NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_SHM_DISABLE",
    "NCCL_IB_DISABLE", "NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_BUFFSIZE",
    "NCCL_NTHREADS", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    # worldplay: where the inputs were read from (each is verified by its sha256 anyway)
    "WORLDPLAY_DATA_DIR",
})
# Other variables under these prefixes are recorded by name only, never by value, so that a
# reader sees that something else was set.
NAMED_ENV_PREFIXES = ("WORLDPLAY_", "TORCH", "PYTORCH_", "CUDA_", "CUBLAS", "CUDNN_", "NCCL_", "NVIDIA_", "TRITON_",
                      "HF_", "OMP_", "MKL_")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path = PACKAGE_ROOT) -> dict[str, Any] | None:
    """``{"commit", "dirty", "changed", "source": "git"}`` of the checkout, or None without git.

    ``changed`` lists up to 20 changed or untracked paths (``experiments/results`` excluded).
    """
    if shutil.which("git") is None or _run(["git", "rev-parse", "--is-inside-work-tree"], root) != "true":
        return None
    commit = _run(["git", "rev-parse", "HEAD"], root)
    status = _run(["git", "status", "--porcelain", "--untracked-files=normal", "--", ".",
                   *(f":(exclude){p}" for p in DIRTY_EXCLUDES)], root)
    if commit is None or status is None:
        return None
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:20], "source": "git"}


def nvidia_smi() -> list[dict[str, str]] | None:
    """Per-GPU name, uuid, driver, memory, clocks and MIG mode, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ["name", "uuid", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm",
              "mig.mode.current", "power.limit", "pstate"]
    out = _run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
    if out is None:
        return None
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=False)) for line in out.splitlines()]


def selected_env() -> dict[str, str]:
    """The set variables of :data:`RECORDED_ENV` with their values."""
    return {name: value for name, value in sorted(os.environ.items()) if name in RECORDED_ENV}


def other_env_names() -> list[str]:
    """Names (only) of the other set variables under :data:`NAMED_ENV_PREFIXES`."""
    return sorted(name for name in os.environ if name not in RECORDED_ENV and name.startswith(NAMED_ENV_PREFIXES))


def environment(device: str) -> dict[str, Any]:
    """Python, torch, CUDA, cuDNN, GPU (torch's view and nvidia-smi's), host."""
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "env": selected_env(),
        "env_names_only": other_env_names(),
    }
    from ..nn.attention import fa4_version

    env["flash_attn_4"] = fa4_version()  # None where the optional package is absent
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if device == "cuda" and torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 2),
            "multiprocessors": props.multi_processor_count,
        }
        env["nvidia_smi"] = nvidia_smi()
        env["device_name"] = props.name
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def official_checkout(root: Path | None) -> dict[str, Any] | None:
    """Commit and dirty flag of the official code checkout used by an official leg."""
    if root is None:
        return None
    return {"path": str(root), **(git_state(root) or {"commit": None, "source": "no git metadata"})}
