"""Sharded Muon equals the single-process Muon on the averaged gradients: gloo ranks on the CPU (world sizes
2 and 3: even and uneven padding) and NCCL ranks on two GPUs (the record's four banks; tier multigpu).

Gradients are small multiples of 2^-6, so their bf16 copies and the reduce-scatter sums are exact and both
paths see bit-identical averaged gradients; what is compared is the sharding, padding, momentum and
gathering. On the CPU both paths run the same eager fp32 maths: equal to 1e-5. On the GPUs the sharded
path runs compiled, CUDA-graphed bf16 Newton-Schulz in its own stacks (MLP up transposed into MLP down's)
and the single-process one the same maths in eager bf16 PyTorch, so their roundings differ; the tolerance
is derived as in DESIGN.md section 4: against the same update in float64 (fp64 momentum, textbook NS),
the sharded update's relative error is at most twice the single-process update's (the bf16 NS error,
1-2%).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

from optim import Muon, average_gradients
from optim.newton_schulz import newton_schulz_ref
from tests.distributed import run_ranks

# square, wide, tall + wide of one NS shape (merged, the tall one transposed), and a 2-D matrix
SHAPES = [(5, 16, 16), (5, 8, 16), (3, 32, 16), (3, 16, 32), (16, 24)]
RECORD_BANKS = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]  # qo, kv, MLP up, down
STEPS = 3
BF16_ULP = 2.0**-7  # the largest relative spacing of bf16 numbers (8 significant bits)


def local_grads(rank: int, step: int, shapes) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(-4, 5, s, generator=gen).float() * 2.0**-6 for s in shapes]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device).clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Float64Muon:
    """SPEC 5.2 (momentum, Nesterov, MuonEq-R, NS, decoupled weight decay) in float64 with fp64 momentum
    and the textbook NS: the yardstick of both bf16 paths."""

    def __init__(self, weights, lr, weight_decay, momentum=0.97):
        self.w = [w.double() for w in weights]
        self.buf = [torch.zeros_like(w) for w in self.w]
        self.lr, self.wd, self.mu = lr, weight_decay, momentum

    def step(self, grads) -> None:
        for i, g in enumerate(grads):
            g = g.to(self.w[i]).double()
            self.buf[i] = self.buf[i] * self.mu + g
            u = g + self.mu * self.buf[i]
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
            rows, cols = u.shape[-2:]
            x = newton_schulz_ref(u, 5)
            self.w[i] = self.w[i] * (1 - self.lr * self.wd) - self.lr * math.sqrt(max(1.0, rows / cols)) * x


def check_sharded_muon(device: torch.device) -> dict:
    """Run on every rank of an initialised process group; asserts, and returns the measured errors."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cuda = device.type == "cuda"
    shapes = RECORD_BANKS if cuda else SHAPES
    solo = [dist.new_group([r]) for r in range(world)][rank]  # a one-rank group: the unsharded path
    torch.manual_seed(0)
    if cuda:  # the record's hyper-parameters and an init-sized weight (decay does not swamp the update)
        init = [0.02 * torch.randn(s) for s in shapes]
        kw = dict(lr=0.022, weight_decay=0.095)
    else:
        init = [torch.randn(s) for s in shapes]
        kw = dict(lr=0.05, weight_decay=0.1)
    sharded = [torch.nn.Parameter(w.to(device, copy=True)) for w in init]
    single = [torch.nn.Parameter(w.to(device, copy=True)) for w in init]
    opt = Muon(sharded, **kw)
    # The yardstick on the GPUs: the same maths in eager bf16 PyTorch (DESIGN.md section 4); on the CPU
    # every path is eager anyway.
    ref = Muon(single, process_group=solo, cuda_graph=False, **kw)
    truth = Float64Muon([w.to(device) for w in init], **kw) if cuda else None
    fresh = copy.deepcopy(opt.state_dict())
    errors = []
    for step in range(STEPS):
        _set_grads(sharded, local_grads(rank, step, shapes))
        if step % 2 == 0:
            opt.launch_reduce_scatters()  # the caller would step AdamW here
        opt.step()  # on odd steps step() launches the reduce-scatters itself
        mean = [sum(gs) * (1.0 / world) for gs in zip(*(local_grads(r, step, shapes) for r in range(world)))]
        _set_grads(single, mean)
        ref.step()
        if cuda:
            truth.step(mean)
        for i, (p, q, w) in enumerate(zip(sharded, single, init)):
            assert not torch.equal(p.detach().cpu(), w)
            if not cuda:
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
                continue
            w = w.to(device)
            exact = truth.w[i] - w.double()
            e_sharded = rel_err(p.detach() - w, exact)
            e_single = rel_err(q.detach() - w, exact)
            errors.append({"step": step, "shape": shapes[i], "sharded": e_sharded, "single": e_single})
            assert e_single < 5e-2, (step, shapes[i], e_single)  # bf16 NS: 1-2% from float64
            assert e_sharded <= 2 * e_single, (step, shapes[i], e_sharded, e_single)

    # State holds this rank's momentum shards: (padded / world) matrices each, those of the single run's
    # matrices [rank * shard, ...) (padding matrices stay zero). CPU: the same fp32 ops, bitwise equal;
    # GPU: the compiled graph contracts a multiply-add that eager rounds twice: a bf16 ulp at most, or a
    # residue of ~1e-9 where mu * buf cancels the gradient (the gradients are ~2^-6).
    for p, q, s in zip(sharded, single, shapes):
        batch = s[0] if len(s) == 3 else 1
        shard = -(-batch // world)
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == (shard, *s[-2:]) and buf.dtype == torch.bfloat16
        full = ref.state[q]["momentum_buffer"].reshape(batch, *s[-2:])
        lo, hi = min(rank * shard, batch), min((rank + 1) * shard, batch)
        tol = dict(rtol=BF16_ULP, atol=1e-6) if cuda else dict(rtol=0, atol=0)  # atol: a sum that cancels
        torch.testing.assert_close(buf[: hi - lo].float(), full[lo:hi].float(), **tol)
        assert not buf[hi - lo :].any()

    # Round trip, then reset: restoring the pre-priming snapshot zeroes the shard momentum.
    saved_w, saved = [p.detach().clone() for p in sharded], copy.deepcopy(opt.state_dict())
    _set_grads(sharded, local_grads(rank, 99, shapes))
    opt.step()
    after = [p.detach().clone() for p in sharded]
    with torch.no_grad():
        for p, w in zip(sharded, saved_w):
            p.copy_(w)
    opt.load_state_dict(saved)
    _set_grads(sharded, local_grads(rank, 99, shapes))
    opt.step()
    for p, a in zip(sharded, after):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
    opt.load_state_dict(fresh)
    assert all(not opt.state[p] or not opt.state[p]["momentum_buffer"].any() for p in sharded)

    # The non-bank gradients: averaged in place, mixed dtypes.
    gen = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(5, generator=gen), torch.randn(3, 4, generator=gen).bfloat16(), torch.randn(7)]
    expected = [t.clone() for t in tensors]
    for r in range(world):
        if r != rank:
            g = torch.Generator().manual_seed(r)
            others = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g).bfloat16()]
            expected[0] += others[0]
            expected[1] = (expected[1].float() + others[1].float()).bfloat16()
    tensors = [t.to(device) for t in tensors]
    average_gradients(tensors)
    torch.testing.assert_close(tensors[0].cpu(), expected[0] / world)
    torch.testing.assert_close(tensors[1].float().cpu(), expected[1].float() / world, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(tensors[2].cpu(), expected[2])  # same on every rank (global seed): unchanged
    dist.barrier()
    worst = max(errors, key=lambda e: e["sharded"] / e["single"]) if errors else None
    return {"errors": errors, "worst_ratio": worst and worst["sharded"] / worst["single"]}


CHECK = "tests.optim.test_muon_distributed:check_sharded_muon"


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(world, tmp_path):
    run_ranks(CHECK, world, "cpu", tmp_path)


@pytest.mark.multigpu
def test_sharded_equals_single_process_nccl(tmp_path):
    """The record's four banks sharded over two GPUs; the worst sharded / single error ratio is reported."""
    ranks = run_ranks(CHECK, 2, "cuda", tmp_path)
    assert all(r["errors"] for r in ranks)  # the GPU comparison ran on every rank
