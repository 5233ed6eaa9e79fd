"""Multi-rank tests: one check, run by torchrun on gloo (CPU processes, in CI) or NCCL (one process per GPU,
the `multigpu` tier).

`run_ranks("tests.optim.test_muon_distributed:check_sharded_muon", nproc, backend, tmp_path)` launches
`python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.distributed ...`. Each rank
initialises the process group (NCCL on cuda:LOCAL_RANK, or gloo on the CPU), calls the check with its
device, and rank 0 writes what every rank returned to a JSON file, which `run_ranks` returns. A check
asserts on its own rank; a failing one exits non-zero, torchrun stops the other ranks, and the test fails
with the traceback. Every launch has a time limit (bench.launch.run stops torchrun and its workers).

GOLFBENCH_TEST_REPORT=FILE appends each launch's results (the measured errors and their tolerances) to
FILE as JSON lines, for the multi-GPU report (bench/multigpu_check.sh).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

REPORT_ENV = "GOLFBENCH_TEST_REPORT"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def report(name: str, data: dict) -> None:
    """Append one JSON line to $GOLFBENCH_TEST_REPORT (nothing without it)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": name, **data}, default=str) + "\n")


def gloo_threads() -> list[str]:
    """Names of this process's native threads that belong to gloo (Linux /proc; [] elsewhere). After
    destroy_process_group there must be none, else the group outlived it (see
    optim.distributed.init_process_group)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if "gloo" in n)


def run_ranks(check: str, nproc: int, device: str, tmp_path: Path, timeout: float = 300.0, **kwargs) -> list:
    """Run `check` ("module:function", called as function(device, **kwargs)) on `nproc` ranks of the
    backend for `device` ("cpu": gloo, "cuda": NCCL); returns the ranks' results in rank order."""
    from bench.launch import child_env, run, torchrun_command

    out = tmp_path / f"{check.rpartition(':')[2]}-{device}-{nproc}.json"
    target = ["-m", "tests.distributed", check, str(out), "--device", device, "--kwargs", json.dumps(kwargs)]
    finished = run(torchrun_command(nproc, target), env=child_env(), timeout=timeout)
    assert not finished.timed_out, f"{check} on {nproc} {device} ranks did not finish:\n{finished.tail()}"
    assert finished.returncode == 0, f"{check} on {nproc} {device} ranks failed:\n{finished.tail()}"
    data = json.loads(out.read_text())
    report(check, {"device": device, "world": nproc, "seconds": finished.seconds, **data})
    return data["ranks"]


def _worker(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from optim.distributed import init_process_group

    p = argparse.ArgumentParser(description="one rank of a multi-rank test (launched by torchrun)")
    p.add_argument("check", help="module:function")
    p.add_argument("out", help="JSON file rank 0 writes")
    p.add_argument("--device", choices=sorted(BACKENDS), required=True)
    p.add_argument("--kwargs", default="{}")
    args = p.parse_args(argv)
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        init_process_group("nccl", device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        init_process_group("gloo")
    try:
        module, _, name = args.check.partition(":")
        result = getattr(importlib.import_module(module), name)(device, **json.loads(args.kwargs)) or {}
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        if dist.get_rank() == 0:
            Path(args.out).write_text(
                json.dumps({"backend": dist.get_backend(), "ranks": results}, default=str) + "\n"
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # a group kept alive past destroy keeps its threads into interpreter exit, where they abort at random
    alive = gloo_threads()
    assert not alive, f"rank {os.environ.get('RANK')}: gloo threads {alive} outlived destroy_process_group"
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
