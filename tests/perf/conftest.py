"""Perf tests: the pytest-benchmark regression gate. Run them with `python -m bench gate`.

How to add one: create tests/perf/test_perf_<x>.py with

    import pytest
    import torch

    pytestmark = [pytest.mark.gpu, pytest.mark.perf]

    def test_perf_my_kernel(cuda_bench):
        x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)  # inputs outside the timed call
        cuda_bench(lambda: my_kernel(x))

`cuda_bench(fn)` runs fn a few times untimed (compilation, autotuning, allocator warm-up), then
times ROUNDS rounds of ITERATIONS calls; under the gate the timer synchronises the GPU, so each
round is finished GPU work. Keep a test under ~1 s. A new test has no baseline entry and is not
compared until someone runs `python -m bench gate --update` on the GPU and commits the new baseline.
"""

from __future__ import annotations

import os

import pytest
import torch

# Mirrors bench.gate.GPU_ENV_VAR (not imported, so this conftest also loads where bench is not importable).
GPU_ENV_VAR = "GOLFBENCH_GATE_GPU"

WARMUP_ROUNDS = 3
ROUNDS = 20
ITERATIONS = 5  # calls per timed round: amortises the synchronisation in the timer


@pytest.fixture
def cuda_bench(benchmark):
    """benchmark.pedantic with warm-up; returns fn's last result."""

    def run(fn, *, rounds: int = ROUNDS, iterations: int = ITERATIONS, warmup_rounds: int = WARMUP_ROUNDS):
        return benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)

    return run


def gate_gpu_name() -> str:
    """The GPU model the timings belong to: the gate's choice, else the visible CUDA device."""
    name = os.environ.get(GPU_ENV_VAR)
    if name:
        return name
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Store the GPU model with every saved run: baselines are only comparable on the same model."""
    machine_info["gpu"] = gate_gpu_name()


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    """Refuse a comparison against timings from another GPU model (also when pytest is run by hand)."""
    stored = (compared_benchmark.get("machine_info") or {}).get("gpu")
    if stored != machine_info.get("gpu"):
        raise pytest.UsageError(
            f"refusing to compare perf timings across GPU models: baseline from {stored!r}, "
            f"this run is on {machine_info.get('gpu')!r}"
        )
