"""Sharded Muon under gloo (CPU processes) equals the single-process Muon on the averaged gradients.

World sizes 2 and 3 cover even and uneven padding (banks of 5 and 3 matrices). Gradients are small
multiples of 2^-6, so their bf16 copies and the reduce-scatter sums are exact and both paths see
bit-identical averaged gradients; what is compared is the sharding, padding, momentum and gathering.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim import Muon, average_gradients
from tests.distributed import free_port, init_gloo

# square, wide, tall + wide of one NS shape (merged, the tall one transposed), and a 2-D matrix
SHAPES = [(5, 16, 16), (5, 8, 16), (3, 32, 16), (3, 16, 32), (16, 24)]
STEPS = 3


def local_grads(rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(-4, 5, s, generator=gen).float() * 2.0**-6 for s in SHAPES]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _worker(rank: int, world: int, port: int) -> None:
    init_gloo(rank, world, port)
    try:
        solo = [dist.new_group([r]) for r in range(world)][rank]  # a one-rank group: the unsharded path
        torch.manual_seed(0)
        init = [torch.randn(s) for s in SHAPES]
        sharded = [torch.nn.Parameter(w.clone()) for w in init]
        single = [torch.nn.Parameter(w.clone()) for w in init]
        kw = dict(lr=0.05, weight_decay=0.1)
        opt = Muon(sharded, **kw)
        ref = Muon(single, process_group=solo, **kw)
        fresh = copy.deepcopy(opt.state_dict())
        for step in range(STEPS):
            _set_grads(sharded, local_grads(rank, step))
            if step % 2 == 0:
                opt.launch_reduce_scatters()  # the caller would step AdamW here
            opt.step()  # on odd steps step() launches the reduce-scatters itself
            mean = [sum(gs) * (1.0 / world) for gs in zip(*(local_grads(r, step) for r in range(world)))]
            _set_grads(single, mean)
            ref.step()
            for p, q, w in zip(sharded, single, init):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
                assert not torch.equal(p.detach(), w)

        # State holds this rank's momentum shards: (padded / world) matrices each.
        for p, s in zip(sharded, SHAPES):
            batch = s[0] if len(s) == 3 else 1
            buf = opt.state[p]["momentum_buffer"]
            assert buf.shape == (-(-batch // world), *s[-2:]) and buf.dtype == torch.bfloat16

        # Round trip, then reset: restoring the pre-priming snapshot zeroes the shard momentum.
        saved_w, saved = [p.detach().clone() for p in sharded], copy.deepcopy(opt.state_dict())
        _set_grads(sharded, local_grads(rank, 99))
        opt.step()
        after = [p.detach().clone() for p in sharded]
        with torch.no_grad():
            for p, w in zip(sharded, saved_w):
                p.copy_(w)
        opt.load_state_dict(saved)
        _set_grads(sharded, local_grads(rank, 99))
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
        average_gradients(tensors)
        torch.testing.assert_close(tensors[0], expected[0] / world)
        torch.testing.assert_close(tensors[1].float(), expected[1].float() / world, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(tensors[2], expected[2])  # same on every rank (global seed): unchanged
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(world):
    mp.spawn(_worker, args=(world, free_port()), nprocs=world, join=True)
