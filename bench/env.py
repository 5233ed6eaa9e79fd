"""The environment of every result: what ran, on what, from which commit; and the GPUs' datasheet peaks.

`collect_env()` (a bench run's header) never needs a GPU; on a machine without CUDA it describes the CPU
side and says why the GPU fields are empty. `run_environment()` is the flat header of a train.py run,
from the same pieces. Measured ceilings come from bench.harness.measure_ceilings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `python -m bench --help` must not wait for it
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Datasheet peaks: dense bf16 tensor-core TFLOP/s (no sparsity) and HBM TB/s, from NVIDIA's product
# pages. Matched by substring of torch.cuda.get_device_name(), most specific first. The SXM H100
# reports itself as "NVIDIA H100 80GB HBM3".
DATASHEET_PEAKS: list[tuple[tuple[str, ...], dict]] = [
    (("H100 PCIe",), {"model": "H100 PCIe", "bf16_tflops": 756.0, "hbm_tbps": 2.0}),
    (("H100 NVL",), {"model": "H100 NVL", "bf16_tflops": 835.0, "hbm_tbps": 3.9}),
    (("H100 80GB HBM3", "H100 SXM"), {"model": "H100 SXM", "bf16_tflops": 989.0, "hbm_tbps": 3.35}),
    (("H200",), {"model": "H200 SXM", "bf16_tflops": 989.0, "hbm_tbps": 4.8}),
    (("A100",), {"model": "A100", "bf16_tflops": 312.0, "hbm_tbps": 1.555}),  # 40 GB; the 80 GB has 2.0
]


def output_folder(kind: str, label: str, now: dt.datetime | None = None) -> Path:
    """runs/bench/[<kind>-]<UTC time>-<label>/: the one default home of every bench command's outputs
    (train.py's runs are beside it under runs/)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return Path("runs") / "bench" / f"{kind + '-' if kind else ''}{now:%Y%m%dT%H%M%SZ}-{label}"


def out_folder_arg(value: str) -> str:
    """argparse type of every --out: refuse a path no folder can be made at up front, not as an error
    after the work is done."""
    from model.atomic import folder_blocker

    problem = folder_blocker(value)
    if problem:
        raise argparse.ArgumentTypeError(
            f"{problem}; give a folder path for the outputs (created if missing)"
        )
    return value


def datasheet_peaks(gpu_name: str | None) -> dict | None:
    """The datasheet entry whose pattern occurs in `gpu_name`, or None for an unknown GPU."""
    if not gpu_name:
        return None
    for patterns, peaks in DATASHEET_PEAKS:
        if any(p.lower() in gpu_name.lower() for p in patterns):
            return dict(peaks)
    return None


def peak_flops(gpu_name: str | None) -> float | None:
    """Dense bf16 FLOP/s of one GPU from its datasheet (for MFU), or None for an unknown GPU."""
    peaks = datasheet_peaks(gpu_name)
    return peaks["bf16_tflops"] * 1e12 if peaks else None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info() -> dict:
    """Commit and dirty flag of the repository; GOLFBENCH_GIT_SHA, when set, names the commit of a tree
    copied without (or with a stale) .git."""
    sha = None if os.environ.get("GOLFBENCH_GIT_SHA") else _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if sha:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
        return {"sha": sha, "short_sha": sha[:10], "dirty": bool(status)}
    sha = os.environ.get("GOLFBENCH_GIT_SHA", "")
    return {"sha": sha or "unknown", "short_sha": sha[:10] or "unknown", "dirty": None}


def driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown"
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else "unknown"


def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # an unusable triton is reported, not fatal
        return None
    return triton.__version__


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_slug(name: str) -> str:
    """A folder name for a GPU model: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in slug.split("-") if part) or "unknown-gpu"


def collect_env() -> dict:
    """Everything that makes a timing reproducible, as a JSON-able dict."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda_runtime": torch.version.cuda,
        "git": git_info(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "datasheet": None,
    }
    if not torch.cuda.is_available():
        env["no_gpu_reason"] = (
            "torch.cuda.is_available() is False"
            + (" (CUDA_VISIBLE_DEVICES is empty)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else "")
            + (
                f" (torch {torch.__version__} is a CPU-only build)"
                if torch.version.cuda is None
                else " (no visible CUDA device)"
            )
        )
        return env
    props = torch.cuda.get_device_properties(0)
    env["gpu"] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "driver": driver_version(),
    }
    env["datasheet"] = datasheet_peaks(props.name)
    return env


def run_environment(device: torch.device, world_size: int) -> dict:
    """The environment header of a train.py run (train.log, config.json, report.json)."""
    import torch

    git = git_info()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "git_sha": git["sha"],
        "git_dirty": git["dirty"],
    }


def format_env(env: dict) -> str:
    """Human-readable lines for `python -m bench env`."""
    git = env["git"]
    dirty = {True: " (dirty)", False: "", None: ""}[git["dirty"]]
    lines = [
        f"python        {env['python']}  ({sys.executable})",
        f"platform      {env['platform']}",
        f"cpu           {env['cpu']} x{env['cpu_count']}",
        f"torch         {env['torch']}  (CUDA runtime {env['cuda_runtime'] or 'none: CPU build'})",
        f"triton        {env['triton'] or 'not importable'}",
        f"git           {git['sha']}{dirty}",
    ]
    gpu = env.get("gpu")
    if gpu is None:
        lines.append(f"gpu           none: {env.get('no_gpu_reason', 'no CUDA')}")
    else:
        l2 = f"{gpu['l2_bytes'] / 2**20:.0f} MiB" if gpu["l2_bytes"] else "unknown"
        lines += [
            f"gpu           {gpu['name']} x{gpu['count']} (sm_{gpu['capability'].replace('.', '')})",
            f"SMs           {gpu['sm_count']}",
            f"L2            {l2}",
            f"memory        {gpu['memory_bytes'] / 2**30:.1f} GiB",
            f"driver        {gpu['driver']}",
        ]
        ds = env.get("datasheet")
        if ds:
            lines.append(
                f"datasheet     {ds['model']}: {ds['bf16_tflops']:.0f} TFLOP/s dense bf16, "
                f"{ds['hbm_tbps']:.2f} TB/s HBM"
            )
        else:
            lines.append("datasheet     none (GPU model not in bench/env.py DATASHEET_PEAKS)")
    ceil = env.get("ceilings")
    if ceil:
        fake = "  [FAKE: --dry-run]" if ceil.get("fake") else ""
        lines.append(
            f"ceilings      matmul {ceil['matmul_shape']} bf16: {ceil['matmul_tflops']:.1f} TFLOP/s "
            f"(p20-p80 {ceil['matmul_tflops_p80']:.1f}-{ceil['matmul_tflops_p20']:.1f}){fake}"
        )
        lines.append(
            f"              copy {ceil['copy_bytes'] / 2**30:.0f} GiB d2d (read+write): "
            f"{ceil['copy_gbps'] / 1e3:.3f} TB/s{fake}"
        )
        ds = env.get("datasheet")
        if ds and not ceil.get("fake"):
            lines.append(
                f"              = {100 * ceil['matmul_tflops'] / ds['bf16_tflops']:.0f}% and "
                f"{100 * ceil['copy_gbps'] / 1e3 / ds['hbm_tbps']:.0f}% of the datasheet"
            )
    elif env.get("ceilings_skipped"):
        lines.append(f"ceilings      skipped: {env['ceilings_skipped']}")
    return "\n".join(lines)
