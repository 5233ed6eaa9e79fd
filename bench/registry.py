"""The vocabulary of a benchmark suite: what a case is, what a provider is, and how suites register.

A suite is a function `cases(quick: bool) -> list[Case]` decorated with `@register(name, doc)`.
Building cases must not touch the GPU: a provider's `setup()` allocates its inputs and returns
the zero-argument callable to time, and only the harness calls it. That is what lets
`python -m bench run --dry-run` walk every suite on a machine without CUDA.

Suite versions. Every suite has a version string (`@register(name, doc, version="2")`, default "1"),
written into each results file (env.suite_versions); `python -m bench compare` refuses to compare a
suite whose versions differ (unless --force). Bump it when the same (case, provider) label would time
different work, so an old timing is no longer comparable: a case's shape, dtype or params change, a
provider's timed call does more or less (inputs, what is inside the call, compile settings), or the
baseline changes. Do not bump it for new cases or providers (they are reported as only in one file),
for changes to the code being measured (that is what a comparison is for), or for notes and docs.
Quick mode has its own cases and is never compared with a full run, so changing only the quick
branch needs no bump either.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def needs_cuda() -> str | None:
    """The `unavailable` of a provider that times GPU work."""
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU"


def needs_our_kernels() -> str | None:
    """The `unavailable` of a provider that calls our Triton TMA kernels (CUDA, Hopper, Triton)."""
    from kernels._runtime import platform_blocker

    return needs_cuda() or platform_blocker("cuda", 0)


@dataclass(frozen=True)
class Provider:
    """One implementation of a case's computation.

    setup: allocates inputs (on the GPU) and returns the callable that is timed.
    unavailable: returns None when the provider can run here, else the reason it is skipped.
    check: optional; returns the provider's accuracy against the case's reference (a JSON-able dict,
        stored in the record as `accuracy`), run once before timing.
    """

    name: str
    setup: Callable[[], Callable[[], object]]
    unavailable: Callable[[], str | None] = lambda: None
    check: Callable[[], dict] | None = None


@dataclass
class Case:
    """One measured configuration, timed once per provider.

    flops / bytes: useful FLOPs and the minimal HBM traffic of one call (each input read once,
    each output written once); they turn times into TFLOP/s and GB/s.
    baseline: the provider every other one is compared with (speedup = baseline_ms / provider_ms).
    x: the key of `params` that is the plot's x axis; series: keys that split cases into figures.
    cuda_graph: time by CUDA-graph replay (for microsecond kernels where launch gaps dominate).
    """

    suite: str
    label: str
    params: dict
    flops: float
    bytes: float
    providers: list[Provider]
    baseline: str
    x: str | None = None
    series: tuple[str, ...] = ()
    cuda_graph: bool = False
    notes: str = ""


@dataclass
class Suite:
    name: str
    description: str
    cases: Callable[[bool], list[Case]]
    tags: tuple[str, ...] = field(default=())
    version: str = "1"


SUITES: dict[str, Suite] = {}


def suite_modules() -> list[str]:
    """The suites' names without importing them (torch, kernels): each suite is registered under the name
    of its module in bench/suites/ (checked by tests/bench/test_bench_cli.py)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "suites")]))


def register(name: str, description: str, version: str = "1"):
    """Decorator: register `cases(quick) -> list[Case]` as suite `name` (version: see the module doc)."""

    def wrap(fn: Callable[[bool], list[Case]]):
        if name in SUITES:
            raise ValueError(f"benchmark suite {name!r} is registered twice")
        SUITES[name] = Suite(name, description, fn, version=str(version))
        return fn

    return wrap
