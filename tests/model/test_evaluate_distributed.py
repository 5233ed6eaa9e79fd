"""Evaluation across ranks equals one process: non-overlapping and sliding-window scoring (windows split
across ranks, sums all-reduced) and score-first TTT (sequences split, gradients averaged). gloo ranks on
the CPU at 2 and 4 ranks; NCCL ranks on two GPUs (tier multigpu).

TTT splits a chunk's sequences contiguously (as the record does), so W ranks equal one process when
each rank's share is one batch: W ranks at ``batch_seqs`` = share take the steps of one process at
``batch_seqs`` = all of the chunk. With 2 sequences over 4 ranks, two ranks have none and the mean is
over the two that do.

On the GPUs scoring runs as the record's does (bf16 autocast, compiled scorer) and must still equal one
process to 1e-6: every window is scored by the same kernels on a batch of the same (padded) shape, each
row independently, so a token's loss does not depend on which rank scored it; only the float64 sums
are added in another order. TTT runs in fp32 and eager there: its comparison is about splitting and
averaging (in bf16 the per-rank gradients would round differently from one process's), and its compiled
scorer is the one just compared.
"Auto" attention is pinned to PyTorch's own selection: it picks its backend by timing in each process,
so two ranks could otherwise run different kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from model import evaluate as ev
from tests.distributed import run_ranks
from tests.model.random_models import random_gpt

SEQ, STRIDE, N_CHUNKS = 32, 8, 4


def _gpt(seed: int, device: torch.device):
    return random_gpt(seed, looping=True, attn_impl="sdpa").to(device)


def _ttt(model, tokens, chunk, batch_seqs, **ranks):
    config = ev.TTTConfig(
        seq_len=SEQ, stride=STRIDE, chunk_tokens=chunk, lr=0.001, epochs=2,
        batch_seqs=batch_seqs, batch_windows=4, hash_embed=True, hash_embed_size=256,
        grad_clip=1e6,  # no clipping (it would hide a wrongly scaled mean), so a small lr: large unclipped
        # steps on random weights amplify fp32 rounding between summation orders
    )  # fmt: skip
    return ev.ttt_score_first(model, tokens, None, config, **ranks)


def check_evaluation(device: torch.device, chunk: int) -> dict:
    """Run on every rank of an initialised process group; asserts, and returns the compared values."""
    world = dist.get_world_size()
    tokens = torch.randint(0, 1024, (N_CHUNKS * chunk + 1,), generator=torch.Generator().manual_seed(3))
    m = _gpt(11, device)
    out = {}
    for fn, args in (
        (ev.eval_non_overlapping, (SEQ, 2)),
        (ev.eval_sliding_window, (SEQ, STRIDE, 4)),
    ):
        alone = fn(m, tokens, *args, rank=0, world_size=1)
        split = fn(m, tokens, *args)  # rank and world size from the process group
        assert split["tokens"] == alone["tokens"] == N_CHUNKS * chunk, fn.__name__
        assert split["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6), fn.__name__
        out[fn.__name__] = (alone["val_loss"], split["val_loss"])

    n_seqs = chunk // SEQ
    fp32 = {"autocast_dtype": torch.float32, "compile": False} if device.type == "cuda" else {}
    m_alone, m_split = _gpt(12, device), _gpt(12, device)
    alone = _ttt(m_alone, tokens, chunk, n_seqs, rank=0, world_size=1, **fp32)
    split = _ttt(m_split, tokens, chunk, max(1, n_seqs // world), **fp32)
    assert split["train_steps"] == alone["train_steps"] == (N_CHUNKS - 1) * 2  # one step per epoch
    assert split["chunk_tokens_scored"] == alone["chunk_tokens_scored"]
    torch.testing.assert_close(split["chunk_loss_sum"], alone["chunk_loss_sum"], rtol=1e-5, atol=1e-4)
    for (name, a), b in zip(m_split.state_dict().items(), m_alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # the same adapted weights
    assert not torch.equal(m_split.qo_bank.cpu(), random_gpt(12).qo_bank)  # it did adapt
    dist.barrier()
    out["ttt_chunk_loss_sum"] = (alone["chunk_loss_sum"], split["chunk_loss_sum"])
    return out


CHECK = "tests.model.test_evaluate_distributed:check_evaluation"


@pytest.mark.parametrize(
    "world, chunk",
    [(2, 4 * SEQ), (4, 4 * SEQ), (4, 2 * SEQ)],
    ids=["2 ranks", "4 ranks", "4 ranks, 2 with data"],
)
def test_evaluation_across_ranks_equals_one_process(world, chunk, tmp_path):
    run_ranks(CHECK, world, "cpu", tmp_path, chunk=chunk)


@pytest.mark.multigpu
def test_evaluation_across_nccl_ranks_equals_one_process(tmp_path):
    run_ranks(CHECK, 2, "cuda", tmp_path, chunk=4 * SEQ)
