"""Test tiers (DESIGN.md section 4).

1. CPU: everything unmarked.
2. interpreter: real Triton kernels under TRITON_INTERPRET=1, set here when there is no CUDA,
   before any kernel module is imported (triton.jit reads the variable at decoration time).
3. gpu: needs CUDA; skipped automatically without it. perf: only with --run-perf.
   multigpu: needs 2+ CUDA GPUs (NCCL ranks launched with torchrun); skipped otherwise. Its checks are the
   gloo tests' own (tests/distributed.py), so CI covers their logic on CPU processes.
"""

from __future__ import annotations

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-perf", action="store_true", help="run the perf (pytest-benchmark gate) tests")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if has_cuda else 0
    run_perf = config.getoption("--run-perf")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multigpu = pytest.mark.skip(reason=f"needs 2+ CUDA GPUs ({gpus} visible)")
    skip_perf = pytest.mark.skip(reason="perf gate: run with --run-perf (or python -m bench gate)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multigpu)
        if "perf" in item.keywords and not run_perf:
            item.add_marker(skip_perf)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the interpreter tier runs the real kernels: the CPU under the interpreter, else a Hopper GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        return torch.device("cuda")
    pytest.skip("interpreter tier: needs TRITON_INTERPRET=1 or a Hopper GPU")


def pytest_sessionfinish(session, exitstatus):
    """A run in which nothing passed must not look green (e.g. everything skipped)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus != 0 or session.config.option.collectonly:
        return
    if not reporter.stats.get("passed"):
        reporter.write_line("golfbench: no test passed in this run; failing it on purpose", red=True)
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
