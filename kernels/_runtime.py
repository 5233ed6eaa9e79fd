"""What a kernel may assume about the machine it runs on.

Every kernel module asks here before launching Triton code, so the rules for "can this run?"
live in one place: CUDA present, a Hopper GPU (TMA descriptors and wgmma need sm_90), or the
Triton interpreter (TRITON_INTERPRET=1), which runs the same kernels on CPU tensors.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger("golfbench.kernels")

IMPLS = ("auto", "triton", "torch")

# Launches of our kernels by name, counted at run time (also inside compiled graphs, whose custom ops
# run the launchers): the proof that a run really used a kernel, not a silent fallback.
launches: collections.Counter = collections.Counter()

# Test hook: GOLFBENCH_FAULT_KERNEL=mlp makes the fused MLP kernel compute a wrong activation, so that
# the preflight check (model/run/preflight.py) can be seen to catch a broken kernel.
FAULT_KERNEL_ENV = "GOLFBENCH_FAULT_KERNEL"


def planted_fault(kernel: str) -> bool:
    return kernel in os.environ.get(FAULT_KERNEL_ENV, "").split(",")


_poison = False


@contextlib.contextmanager
def poisoned_outputs():
    """While active, kernel outputs are allocated filled with NaN, so a check can see every element
    written (the preflight check and the tests)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (NaN-filled under poisoned_outputs())."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _poison else out


_logged: set[str] = set()


def log_once(key: str, message: str) -> None:
    """Log `message` at INFO the first time `key` is seen (fallback reasons, chosen configs).

    A no-op while torch.compile traces: logging there would be a side effect in the graph."""
    if torch.compiler.is_compiling():
        return
    if key not in _logged:
        _logged.add(key)
        log.info(message)


def use_triton(op: str, impl: str, blocker: str | None) -> bool:
    """The one dispatch rule of every kernel: run Triton or the PyTorch reference?

    "torch": the reference. "triton": the kernel, or ValueError saying what blocks it. "auto": the
    kernel unless something blocks it, else the reference with the reason logged once."""
    if impl == "torch":
        return False
    if blocker is None:
        return True
    if impl == "triton":
        raise ValueError(f"{op}: impl='triton' cannot run: {blocker}")
    log_once(f"{op}:{blocker}", f"{op}: using the PyTorch reference because {blocker}")
    return False


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_import_error() -> str | None:
    """None when triton and its host-side TMA descriptor import, else the reason."""
    try:
        import triton  # noqa: F401
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except Exception as exc:  # any import failure means "use the reference"
        return f"triton is not usable ({type(exc).__name__}: {exc})"
    return None


def tma_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton TMA kernels can run on tensors of `device`, else why not.

    On CPU tensors that needs the interpreter; on CUDA it needs compute capability 9.x.
    """
    reason = triton_import_error()
    if reason:
        return reason
    if device.type == "cpu":
        return None if interpreter_active() else "tensors are on the CPU and TRITON_INTERPRET is not set"
    if device.type != "cuda":
        return f"device type {device.type!r} is not supported by the Triton kernels"
    if interpreter_active():
        return "TRITON_INTERPRET=1 is set but the tensors are on CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"GPU is sm_{major}{minor}; the TMA kernels are written for Hopper (sm_90)"
    return None


@torch.compiler.assume_constant_result
def platform_blocker(device_type: str, device_index: int = 0) -> str | None:
    """tma_unavailable_reason() for a device given as constants (`t.device.type, t.device.index or 0`).

    torch.compile evaluates it once at trace time and folds the answer into the graph, so the
    kernels' dispatch costs no graph break and no guard on the environment. Eager calls hit a cache
    keyed by everything the answer depends on (the interpreter switch included).
    """
    return _platform_reason(device_type, device_index, interpreter_active())


@functools.cache
def _platform_reason(device_type: str, device_index: int, _interpreter: bool) -> str | None:
    if device_type == "cuda":
        return tma_unavailable_reason(torch.device("cuda", device_index))
    return tma_unavailable_reason(torch.device(device_type))


@functools.cache
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of a CUDA device (the persistent grid size); 4 under the interpreter."""
    if interpreter_active() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count
