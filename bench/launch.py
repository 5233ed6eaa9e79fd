"""Starting child processes that may talk over NCCL: the torchrun command line, their environment, and a
run with a time limit that leaves nothing behind.

Every child environment keeps NVLink multicast off (DESIGN.md section 7: on a shared host it can take the
GPUs down): NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set
where absent, and a value the machine already has is never replaced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# torchrun stops the other workers of a failed one with SIGTERM, then SIGKILL after 30 s
TORCHRUN_GRACE_S = 45.0


def child_env(base: Mapping[str, str] | None = None, **extra) -> dict[str, str]:
    """`base` (default: this process's environment) plus `extra`, with NVLink multicast off."""
    clash = sorted(set(extra) & set(MULTICAST_OFF))
    if clash:
        raise ValueError(f"child_env: {clash} keep the machine's value (NVLink multicast stays off)")
    env = dict(os.environ if base is None else base)
    env.update({k: str(v) for k, v in extra.items()})
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    return env


def torchrun_command(nproc: int, target: Sequence[str]) -> list[str]:
    """torchrun on this machine with `nproc` processes. `target`: a script and its arguments, or
    ["-m", module, arguments...]. This interpreter's torch.distributed.run, so it is the same Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *target,
    ]


@dataclass
class Finished:
    returncode: int
    stdout: str  # empty when the output was not captured
    stderr: str
    seconds: float
    timed_out: bool

    def tail(self, chars: int = 10000) -> str:
        late = " (timed out)" if self.timed_out else ""
        head = f"exit {self.returncode} after {self.seconds:.1f} s{late}"
        return f"{head}\n{self.stdout[-chars:]}\n{self.stderr[-chars:]}"


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc): torchrun's workers run in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    cwd: str | Path = REPO_ROOT,
    capture: bool = True,
) -> Finished:
    """Run `cmd` to completion or for at most `timeout` seconds (then it and its children are stopped and
    `timed_out` is set). With capture=False the output goes to this process's stdout and stderr."""
    pipe = subprocess.PIPE if capture else None
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=pipe, stderr=pipe, text=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun's agent stops its workers itself; what is left after its grace period (this
        # process's own descendants, by id) gets SIGKILL.
        timed_out = True
        family = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=TORCHRUN_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill([proc.pid, *family])
            out, err = proc.communicate()
    return Finished(proc.returncode, out or "", err or "", time.perf_counter() - start, timed_out)
