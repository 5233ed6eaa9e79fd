"""optim.distributed: a process group set up by init_process_group ends with destroy_process_group.

Run in a fresh interpreter (one gloo rank), because what is tested is the order of imports: a group made
before torch.distributed.nn.functional is imported is kept alive by that module's default arguments, with
gloo's threads, past destroy_process_group (the random SIGABRT at exit of rank 0 in the multi-rank tests).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

from bench.launch import REPO_ROOT, child_env

SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.distributed as dist
    from optim.distributed import init_process_group
    from tests.distributed import gloo_threads

    init_process_group("gloo")
    during = gloo_threads()
    import torch._dynamo  # what the first compile or custom op imports, after the group exists
    t = torch.ones(3)
    dist.all_reduce(t)
    dist.destroy_process_group()
    print(json.dumps({"during": during, "after": gloo_threads()}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_destroy_process_group_ends_gloo_threads():
    env = child_env(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    threads = json.loads(done.stdout.strip().splitlines()[-1])
    assert threads["during"], "no gloo thread seen while the group existed: the check would prove nothing"
    assert threads["after"] == [], f"gloo threads outlived destroy_process_group: {threads['after']}"
