"""Evaluation across gloo ranks equals one process: non-overlapping and sliding-window scoring (windows
split across ranks, sums all-reduced) and score-first TTT (sequences split, gradients averaged).

TTT splits a chunk's sequences contiguously (as the record does), so W ranks equal one process when
each rank's share is one batch: W ranks at ``batch_seqs`` = share take the steps of one process at
``batch_seqs`` = all of the chunk. With 2 sequences over 4 ranks, two ranks have none and the mean is
over the two that do.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import evaluate as ev
from tests.distributed import free_port, init_gloo
from tests.model.random_models import random_gpt

SEQ, STRIDE, N_CHUNKS = 32, 8, 4


def _ttt(model, tokens, chunk, batch_seqs, **ranks):
    config = ev.TTTConfig(
        seq_len=SEQ, stride=STRIDE, chunk_tokens=chunk, lr=0.001, epochs=2,
        batch_seqs=batch_seqs, batch_windows=4, hash_embed=True, hash_embed_size=256,
        grad_clip=1e6,  # no clipping (it would hide a wrongly scaled mean), so a small lr: large unclipped
        # steps on random weights amplify fp32 rounding between summation orders
    )  # fmt: skip
    return ev.ttt_score_first(model, tokens, None, config, **ranks)


def _worker(rank: int, world: int, port: int, chunk: int) -> None:
    init_gloo(rank, world, port)
    torch.set_num_threads(1)
    try:
        tokens = torch.randint(0, 1024, (N_CHUNKS * chunk + 1,), generator=torch.Generator().manual_seed(3))
        m = random_gpt(11, looping=True)
        for fn, args in (
            (ev.eval_non_overlapping, (SEQ, 2)),
            (ev.eval_sliding_window, (SEQ, STRIDE, 4)),
        ):
            alone = fn(m, tokens, *args, rank=0, world_size=1)
            split = fn(m, tokens, *args)  # rank and world size from the process group
            assert split["tokens"] == alone["tokens"] == N_CHUNKS * chunk, fn.__name__
            assert split["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6), fn.__name__

        n_seqs = chunk // SEQ
        m_alone, m_split = random_gpt(12, looping=True), random_gpt(12, looping=True)
        alone = _ttt(m_alone, tokens, chunk, n_seqs, rank=0, world_size=1)
        split = _ttt(m_split, tokens, chunk, max(1, n_seqs // world))
        assert split["train_steps"] == alone["train_steps"] == (N_CHUNKS - 1) * 2  # one step per epoch
        assert split["chunk_tokens_scored"] == alone["chunk_tokens_scored"]
        torch.testing.assert_close(split["chunk_loss_sum"], alone["chunk_loss_sum"], rtol=1e-5, atol=1e-4)
        for (name, a), b in zip(m_split.state_dict().items(), m_alone.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # the same adapted weights
        assert not torch.equal(m_split.qo_bank, random_gpt(12).qo_bank)  # it did adapt
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world, chunk",
    [(2, 4 * SEQ), (4, 4 * SEQ), (4, 2 * SEQ)],
    ids=["2 ranks", "4 ranks", "4 ranks, 2 with data"],
)
def test_evaluation_across_ranks_equals_one_process(world, chunk):
    mp.spawn(_worker, args=(world, free_port(), chunk), nprocs=world, join=True)
