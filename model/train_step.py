"""One training step of the record (SPEC.md Appendix B): the model as it trains (dtypes, same weights on
every rank, torch.compile), the forward/backward over a rank's micro-batches, the per-rank gradient clip,
and the guard that stops before the optimizer step when a loss or gradient is not finite.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from optim.distributed import Dist

from .gpt import GPT
from .run_config import Config, model_config

FAULT_ENV = "GOLFBENCH_FAULT_NAN"  # test hook: "STEP" or "STEP:RANK" poisons that step's loss with NaN
FAULT_EXIT_ENV = "GOLFBENCH_FAULT_EXIT"  # test hook: "STEP" or "STEP:RANK": that rank dies at that step


def build_model(cfg: Config, device: torch.device, pd: Dist | None = None) -> GPT:
    """GPT in the record's training dtypes (bf16 embedding master, fp32 banks/scalars), same on all ranks."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, device)).to(device)
    model.to_training_dtypes(getattr(torch, cfg.embed_dtype))
    if pd is not None:
        pd.broadcast_(model.state_dict().values())
    return model


def compile_model(model, cfg: Config, device: torch.device):
    on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    if not on:
        return model
    torch._dynamo.config.cache_size_limit = max(16, torch._dynamo.config.cache_size_limit)
    return torch.compile(model, fullgraph=True, dynamic=False)


def compile_cache() -> dict:
    """torch.compile's persistent caches (Inductor's FX graphs, AOTAutograd's, Triton's kernels: on by
    default, kept under `inductor_dir` across processes, so a second run of one configuration on a
    machine skips most compilation): where they are, how many files they hold, and this process's
    hits and misses so far."""
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = cache_dir()
    return {
        "inductor_dir": root,
        "fx_graph_cache": bool(inductor_config.fx_graph_cache),
        "autograd_cache": bool(getattr(functorch_config, "enable_autograd_cache", False)),
        "files": sum(len(f) for _, _, f in os.walk(root)) if os.path.isdir(root) else 0,
        "fx_graph_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fx_graph_misses": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
    }


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fault_step(rank: int, env: str = FAULT_ENV) -> int | None:
    """The step at which the test hook `env` strikes this rank (None: no fault)."""
    spec = os.environ.get(env)
    if not spec:
        return None
    step, _, at_rank = spec.partition(":")
    return int(step) if not at_rank or int(at_rank) == rank else None


def die_if_planted(exit_at: int | None, step: int, rank: int) -> None:
    """FAULT_EXIT_ENV's rank death: exit as a crashed rank would, nothing cleaned up."""
    if exit_at == step:
        print(
            f"rank {rank}: {FAULT_EXIT_ENV} at step {step}, time {time.time():.3f}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def forward_backward(model_c, batches, accum: int, device, poison: bool = False) -> torch.Tensor:
    """Gradients of the mean loss over this rank's accum micro-batches (``batches.next(j, device)``, e.g.
    model.data.RankBatches); returns that mean loss (detached)."""
    total = torch.zeros((), device=device, dtype=torch.float32)
    for j in range(accum):
        x, y = batches.next(j, device)
        with autocast(device):
            loss = model_c(x, y)
        if poison and j == 0:
            loss = loss * float("nan")
        (loss / accum).backward()
        total += loss.detach().float()
    return total / accum


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Clip the local gradient (per rank, SPEC §5.6) and return its norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


class NonFiniteError(RuntimeError):
    pass


def check_finite(loss, norm, step: int | str, pd: Dist, log: Callable[[str], None]):
    """Stop before the optimizer step when any rank's loss or gradient is non-finite. One collective
    (flags of every rank + the loss and norm sums) and one host sync per step.
    Returns the rank-mean loss and gradient norm."""
    vec = torch.zeros(pd.world + 2, device=loss.device, dtype=torch.float64)
    vec[pd.rank] = (~(torch.isfinite(loss) & torch.isfinite(norm))).double()
    vec[pd.world] = loss.double()
    vec[pd.world + 1] = norm.double()
    if pd.on:
        dist.all_reduce(vec)
    values = vec.tolist()
    bad = [r for r in range(pd.world) if values[r] != 0]
    if bad:
        where = f"step {step}" if isinstance(step, int) else step
        msg = (
            f"non-finite loss or gradient at {where} on rank(s) {bad} (rank {pd.rank}: loss "
            f"{loss.item():.4g}, grad_norm {norm.item():.4g}); stopped before the optimizer step. Nothing of "
            "this step was applied or written; the last checkpoint (if any) is intact."
        )
        log(f"ERROR: {msg}")
        raise NonFiniteError(msg)
    return values[pd.world] / pd.world, values[pd.world + 1] / pd.world
