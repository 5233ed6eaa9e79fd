"""Non-overlapping, sliding-window and score-first TTT evaluation (SPEC.md §8) on the tiny GPT."""

from __future__ import annotations

import io
import math

import pytest
import sentencepiece as spm
import torch

from model import evaluate as ev
from model import quant
from model.metrics import ByteCounter
from tests.model.random_models import random_gpt

SEQ, STRIDE, CHUNK = 32, 8, 64  # the record's 2048 / 64 / 32768, scaled down (same divisibility)


@pytest.fixture(scope="module")
def sp():
    import pydoc_data.topics as topics

    lines = "\n".join(topics.topics.values()).splitlines()[:20000]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=1024,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


@pytest.fixture(scope="module")
def byte_counter(sp):
    return ByteCounter(sp)


@pytest.fixture(scope="module")
def stream(sp):
    import pydoc_data.topics as topics

    text = "\n".join(list(topics.topics.values())[:40])
    ids = sp.encode(text)
    return torch.tensor(ids[: 8 * CHUNK + 1], dtype=torch.int64)  # total = 512 = 8 chunks


def direct_loss(model, tokens):
    with torch.no_grad():
        return model.per_token_loss(tokens[None, :-1], tokens[None, 1:])[0].double()


def test_window_layout():
    starts = ev.window_starts(100, SEQ, STRIDE)
    assert starts[0] == 0 and all(b - a == STRIDE for a, b in zip(starts, starts[1:]))
    assert all(ws + SEQ - STRIDE < 100 for ws in starts) and starts[-1] + STRIDE + SEQ - STRIDE >= 100
    covered = [p for ws in starts for p in range(*ev.scored_range(ws, 100, SEQ, STRIDE))]
    assert covered == list(range(100))
    assert ev.window_starts(20, SEQ, STRIDE) == [0]  # shorter than the context: the first window only


def test_sliding_scores_every_target_once(stream, byte_counter):
    m = random_gpt(looping=True)
    toks = stream[:301]  # total 300: a partial last window
    r = ev.eval_sliding_window(
        m, toks, SEQ, STRIDE, batch_windows=4, byte_counter=byte_counter, record_positions=True
    )
    assert r["tokens"] == 300 and (r["scored_counts"] == 1).all()
    # the first window is scored from position 0 with its own (growing) context
    torch.testing.assert_close(r["token_loss"][:SEQ].double(), direct_loss(m, toks[: SEQ + 1]))
    # a later position p is scored by the window that gives it SEQ - STRIDE .. SEQ - 1 tokens of context
    p = 200
    ws = max(s for s in ev.window_starts(300, SEQ, STRIDE) if s <= p - (SEQ - STRIDE))
    expect = direct_loss(m, toks[ws : ws + SEQ + 1])[p - ws]
    torch.testing.assert_close(r["token_loss"][p].double(), expect)
    assert r["bytes"] == byte_counter.count(toks[:-1], toks[1:])
    assert r["val_bpb"] == pytest.approx(r["val_loss"] * 300 / (math.log(2) * r["bytes"]), rel=1e-12)


def test_sliding_stream_shorter_than_one_window(stream, byte_counter):
    m = random_gpt(1, looping=True)
    toks = stream[:28]  # total 27 < SEQ
    r = ev.eval_sliding_window(m, toks, SEQ, STRIDE, batch_windows=3, byte_counter=byte_counter)
    d = direct_loss(m, toks)
    assert r["tokens"] == 27 and r["windows"] == 1
    assert r["val_loss"] == pytest.approx(d.sum().item() / 27, rel=1e-6)


def test_sliding_with_stride_seq_len_equals_non_overlapping(stream, byte_counter):
    m = random_gpt(2, looping=True)
    a = ev.eval_non_overlapping(m, stream, SEQ, batch_seqs=3, byte_counter=byte_counter)
    b = ev.eval_sliding_window(m, stream, SEQ, stride=SEQ, batch_windows=3, byte_counter=byte_counter)
    assert a["tokens"] == b["tokens"] == 512 and a["bytes"] == b["bytes"] > 0
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    # and overlap helps a model whose predictions depend on context: different number, same tokens
    c = ev.eval_sliding_window(m, stream, SEQ, STRIDE, batch_windows=3, byte_counter=byte_counter)
    assert c["tokens"] == 512 and c["val_loss"] != pytest.approx(a["val_loss"], rel=1e-4)


def test_ranks_split_contiguously_and_sum_to_the_whole(stream, byte_counter):
    m = random_gpt(3, looping=True)
    whole = ev.eval_sliding_window(m, stream[:301], SEQ, STRIDE, 4, byte_counter)
    parts = [
        ev.eval_sliding_window(m, stream[:301], SEQ, STRIDE, 4, byte_counter, rank=r, world_size=3)
        for r in range(3)
    ]
    assert sum(p["tokens"] for p in parts) == whole["tokens"]
    assert sum(p["bytes"] for p in parts) == whole["bytes"]
    loss = sum(p["val_loss"] * p["tokens"] for p in parts) / whole["tokens"]
    assert loss == pytest.approx(whole["val_loss"], rel=1e-6)
    nparts = [
        ev.eval_non_overlapping(m, stream, SEQ, 2, byte_counter, rank=r, world_size=3) for r in range(3)
    ]
    assert sum(p["tokens"] for p in nparts) == 512


def test_ttt_with_zero_lr_equals_sliding(stream, byte_counter):
    m = random_gpt(4, looping=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = ev.eval_sliding_window(m, stream, SEQ, STRIDE, batch_windows=4, byte_counter=byte_counter)
    t = ev.ttt_score_first(
        m,
        stream,
        byte_counter,
        ev.TTTConfig(seq_len=SEQ, stride=STRIDE, chunk_tokens=CHUNK, lr=0.0, batch_seqs=2, batch_windows=4),
    )
    assert t["val_loss"] == s["val_loss"] and t["tokens"] == s["tokens"] == 512
    assert t["bytes"] == s["bytes"] and t["val_bpb"] == s["val_bpb"]
    assert t["n_chunks"] == 8 and t["chunk_tokens_scored"] == [CHUNK] * 8
    assert t["train_steps"] == 7 * 3  # 2 seqs per chunk, batch 2, 3 epochs, last chunk skipped
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def _ttt(model, tokens, byte_counter, **kw):
    args = dict(seq_len=SEQ, stride=STRIDE, chunk_tokens=CHUNK, lr=0.05, batch_seqs=1, batch_windows=4)
    return ev.ttt_score_first(model, tokens, byte_counter, ev.TTTConfig(**{**args, **kw}))


def test_ttt_is_score_first_and_never_trains_on_the_last_chunk(stream, byte_counter):
    toks = stream[: 4 * CHUNK + 1]  # 4 chunks
    base = random_gpt(5, looping=True)
    sliding = ev.eval_sliding_window(base, toks, SEQ, STRIDE, 4, byte_counter)
    m1 = random_gpt(5, looping=True)
    r1 = _ttt(m1, toks, byte_counter)
    assert r1["val_loss"] != pytest.approx(sliding["val_loss"], rel=1e-4)  # it adapted
    # change every token after chunk 1's last target (index 2*CHUNK): chunks 0 and 1 keep their scores
    alt = toks.clone()
    g = torch.Generator().manual_seed(0)
    alt[2 * CHUNK + 1 :] = torch.randint(0, 1024, (alt.numel() - 2 * CHUNK - 1,), generator=g)
    r2 = _ttt(random_gpt(5, looping=True), alt, byte_counter)
    assert r2["chunk_loss_sum"][:2] == r1["chunk_loss_sum"][:2]
    assert r2["chunk_loss_sum"][2] != r1["chunk_loss_sum"][2]
    # change only the last chunk's targets: the adapted weights are identical (never trained on it)
    last = toks.clone()
    last[3 * CHUNK + 1 :] = torch.randint(0, 1024, (last.numel() - 3 * CHUNK - 1,), generator=g)
    m3 = random_gpt(5, looping=True)
    r3 = _ttt(m3, last, byte_counter)
    assert r3["chunk_loss_sum"][:3] == r1["chunk_loss_sum"][:3]
    for (k, a), b in zip(m1.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(m1.qo_bank, base.qo_bank)


def test_ttt_hash_embedding_trained_then_removed(stream, byte_counter, tmp_path):
    toks = stream[: 3 * CHUNK + 1]
    m_hash, m_plain = random_gpt(6, looping=True), random_gpt(6, looping=True)
    flags = [p.requires_grad for p in m_hash.parameters()]
    with_hash = _ttt(m_hash, toks, byte_counter, hash_embed=True, hash_embed_size=512)
    without = _ttt(m_plain, toks, byte_counter, hash_embed=False)
    # zero-initialised: chunk 0 scores exactly as without it; then it is trained and changes the result
    assert with_hash["chunk_loss_sum"][0] == without["chunk_loss_sum"][0]
    assert with_hash["chunk_loss_sum"][1] != without["chunk_loss_sum"][1]
    assert m_hash.hash_embed is None and [p.requires_grad for p in m_hash.parameters()] == flags
    assert not any("hash" in k for k in m_hash.state_dict())
    path = tmp_path / "after_ttt.ptz"
    quant.save_artifact(m_hash, None, path, method="rtn", passthrough_max_numel=1000)
    _, meta = quant.read_artifact(path)
    assert not any("hash" in k for k in meta)


def test_ttt_restores_model_on_error(stream):
    m = random_gpt(7, looping=True)
    with pytest.raises(ValueError, match="chunk_tokens"):
        ev.ttt_score_first(m, stream, None, ev.TTTConfig(seq_len=SEQ, stride=STRIDE, chunk_tokens=0))
    assert m.hash_embed is None


@pytest.mark.gpu
def test_gpu_compiled_ttt_scores_like_sliding_then_adapts(stream, byte_counter):
    """On CUDA (bf16 autocast, compiled scorer): TTT at lr 0 without the hash embedding scores as the
    sliding window (the same compiled graph); with the record's lr it adapts, chunk 0 is scored before
    any update, and every chunk is scored once. (With the zero-initialised hash embedding the graph has
    one more add, which inductor fuses differently: bf16 rounding, ~4e-5 relative on this model.)"""
    toks = stream[: 4 * CHUNK + 1]
    m = random_gpt(8, looping=True).cuda()
    s = ev.eval_sliding_window(m, toks, SEQ, STRIDE, 4, byte_counter)
    plain = _ttt(m, toks, byte_counter, lr=0.0, hash_embed=False)
    assert plain["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6) and plain["tokens"] == s["tokens"]
    frozen = _ttt(random_gpt(8, looping=True).cuda(), toks, byte_counter, lr=0.0)
    adapted = _ttt(random_gpt(8, looping=True).cuda(), toks, byte_counter, lr=0.01)
    assert adapted["chunk_tokens_scored"] == [CHUNK] * 4 and adapted["train_steps"] == 3 * 3 * 2
    assert adapted["chunk_loss_sum"][0] == pytest.approx(frozen["chunk_loss_sum"][0], rel=1e-6)
    assert adapted["chunk_loss_sum"][1:] != frozen["chunk_loss_sum"][1:]
