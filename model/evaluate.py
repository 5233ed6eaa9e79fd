"""Scoring the validation stream: non-overlapping, sliding-window and legal score-first TTT (SPEC.md §8).

All three take the token stream (1-D, ``total = numel - 1`` predicted tokens; the record trims it to
``usable + 1`` first, SPEC §8.1), a model with ``per_token_loss(ids, targets)``, and a
``model.metrics.ByteCounter`` for bits per byte (``None`` gives loss only). They evaluate the model
as it is set up (the record evaluates the dequantised model with ``looping`` on), in bf16 autocast on
CUDA, with float64 accumulators; ranks split the work contiguously and their sums are all-reduced
when ``torch.distributed`` is initialised. Every function returns a dict with val_loss (nats/token),
val_bpb, tokens, bytes and seconds.

Windows (sliding and TTT): window ws feeds tokens[ws : ws + seq_len] (shorter at the end) and scores
positions [ws + s, ws + wlen) with s = 0 for the first window and seq_len - stride otherwise, so every
target is scored exactly once with >= seq_len - stride tokens of context after the first window.
Batches are padded to a fixed number of rows so a compiled scorer sees one shape.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from optim.distributed import average_gradients, initialized, rank_world

from .metrics import bits_per_byte

DEFAULT_SEQ_LEN = 2048
DEFAULT_STRIDE = 64
DEFAULT_BATCH = 32  # windows / sequences per forward (record)
TTT_CHUNK_TOKENS = 32_768
TTT_EPOCHS = 3
TTT_LR = 0.01  # #1523 (#1493 used 0.005)
TTT_MOMENTUM = 0.9
TTT_GRAD_CLIP = 1.0


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _tokens(val_tokens) -> Tensor:
    t = val_tokens if isinstance(val_tokens, Tensor) else torch.from_numpy(val_tokens)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"val_tokens must be a 1-D stream of >= 2 tokens, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _split(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for this rank."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _all_reduce_(t: Tensor, world_size: int, op=None) -> Tensor:
    if world_size > 1 and initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass(frozen=True)
class _Scoring:
    """How this rank scores, resolved once per call from the public keyword arguments."""

    seq_len: int
    rows: int  # windows per forward: batches are padded to it so that a compiled scorer sees one shape
    byte_counter: object | None
    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool


def _scoring(
    model, seq_len, rows, byte_counter, rank, world_size, device, autocast_dtype, compile
) -> _Scoring:
    default_rank, default_world = rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if autocast_dtype is None and device.type == "cuda":
        autocast_dtype = torch.bfloat16
    if compile is None:
        compile = device.type == "cuda"
    return _Scoring(seq_len, rows, byte_counter, rank, world_size, device, autocast_dtype, compile)


def make_scorer(model: torch.nn.Module, compile: bool):
    """model.per_token_loss, optionally ``torch.compile(fullgraph=True, dynamic=False)`` (SPEC §8.2)."""
    fn = model.per_token_loss
    return torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn


def _count_bytes(byte_counter, tokens: Tensor, lo: int, hi: int) -> int:
    """Bytes of the targets at positions [lo, hi) (inputs tokens[lo:hi], targets tokens[lo+1:hi+1])."""
    if byte_counter is None or hi <= lo:
        return 0
    return int(byte_counter.count(tokens[lo:hi], tokens[lo + 1 : hi + 1]))


def _result(loss_sum: float, n_tokens: int, n_bytes: int, seconds: float, with_bytes: bool) -> dict:
    val_loss = loss_sum / max(n_tokens, 1)
    bpb = bits_per_byte(loss_sum, n_bytes) if with_bytes and n_bytes > 0 else None
    return dict(val_loss=val_loss, val_bpb=bpb, tokens=int(n_tokens), bytes=int(n_bytes), seconds=seconds)


# ---------------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------------


def window_starts(total: int, seq_len: int, stride: int) -> list[int]:
    """ws = 0, stride, 2·stride, ... with ws + (seq_len - stride) < total (SPEC §8.2: 633,409 windows
    for the record). The first window is always kept, so a stream shorter than one window is still
    scored (the record never meets that case)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"need 0 < stride ({stride}) <= seq_len ({seq_len})")
    context = seq_len - stride
    return [0] + [ws for ws in range(stride, total, stride) if ws + context < total]


def scored_range(ws: int, total: int, seq_len: int, stride: int) -> tuple[int, int]:
    """Absolute positions [lo, hi) that window ws scores."""
    return ws + (0 if ws == 0 else seq_len - stride), min(ws + seq_len, total)


class _WindowScorer:
    """Scores batches of windows, accumulating on the device in float64 (no host sync per batch)."""

    def __init__(self, scorer, tokens_dev: Tensor, total: int, sc: _Scoring, record_positions: bool):
        self.scorer, self.tokens, self.total, self.sc = scorer, tokens_dev, total, sc
        device = sc.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.offsets = torch.arange(sc.seq_len, device=device)
        self.counts = torch.zeros(total, dtype=torch.int32, device=device) if record_positions else None
        self.token_loss = torch.full((total,), float("nan"), device=device) if record_positions else None

    def score(self, starts: list[int], first_scored: list[int]) -> None:
        """starts: window starts; first_scored: the first scored offset s of each window."""
        rows, device = self.sc.rows, self.sc.device
        for b0 in range(0, len(starts), rows):
            ws = starts[b0 : b0 + rows]
            s = first_scored[b0 : b0 + rows]
            pad = rows - len(ws)
            ws_t = torch.tensor(ws + [0] * pad, device=device)
            s_t = torch.tensor(s + [self.sc.seq_len] * pad, device=device)  # padded rows score nothing
            pos = ws_t[:, None] + self.offsets[None, :]  # absolute input positions
            valid = pos < self.total
            x = self.tokens[pos.clamp(max=self.total - 1)]
            y = self.tokens[pos.clamp(max=self.total - 1) + 1]
            mask = valid & (self.offsets[None, :] >= s_t[:, None])
            with _autocast(device, self.sc.autocast_dtype):
                nll = self.scorer(x, y)
            nll = nll.float()
            self.loss_sum += torch.where(mask, nll, 0.0).sum(dtype=torch.float64)
            self.n_tokens += mask.sum(dtype=torch.float64)
            if self.counts is not None:
                p = pos[mask]
                self.counts.index_add_(0, p, torch.ones_like(p, dtype=torch.int32))
                self.token_loss[p] = nll[mask]


def _first_scored(starts: list[int], seq_len: int, stride: int) -> list[int]:
    return [0 if ws == 0 else seq_len - stride for ws in starts]


# ---------------------------------------------------------------------------------------------------
# non-overlapping and sliding-window eval
# ---------------------------------------------------------------------------------------------------


def _score(model, tokens, total, starts, first, byte_range, sc: _Scoring, record_positions=False):
    """Score this rank's windows (eval mode, timed), count the bytes of its contiguous target range,
    sum over ranks. Returns (result dict, the scorer)."""
    was_training = model.training
    model.eval()
    _sync(sc.device)
    t0 = time.perf_counter()
    try:
        ws = _WindowScorer(make_scorer(model, sc.compile), tokens.to(sc.device), total, sc, record_positions)
        ws.score(starts, first)
        n_bytes = _count_bytes(sc.byte_counter, tokens, *byte_range) if starts else 0
        sums = torch.stack(
            [ws.loss_sum, ws.n_tokens, torch.tensor(float(n_bytes), dtype=torch.float64, device=sc.device)]
        )
        _all_reduce_(sums, sc.world_size)
        _sync(sc.device)
    finally:
        model.train(was_training)
    loss_sum, n_tok, n_bytes = sums.tolist()
    seconds = time.perf_counter() - t0
    return _result(loss_sum, int(n_tok), int(n_bytes), seconds, sc.byte_counter is not None), ws


@torch.inference_mode()
def eval_non_overlapping(
    model: torch.nn.Module,
    val_tokens,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_seqs: int = DEFAULT_BATCH,
    byte_counter=None,
    rank: int | None = None,
    world_size: int | None = None,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    compile: bool | None = None,
) -> dict:
    """Mean loss / bpb over the ⌊total/seq_len⌋ disjoint sequences (the remainder is not scored), split
    contiguously across ranks, ``batch_seqs`` per forward (the record's pre-/post-quant eval)."""
    tokens = _tokens(val_tokens)
    sc = _scoring(model, seq_len, batch_seqs, byte_counter, rank, world_size, device, autocast_dtype, compile)
    n_seqs = (tokens.numel() - 1) // seq_len
    if n_seqs == 0:
        raise ValueError(f"val_tokens has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    lo, hi = _split(n_seqs, sc.rank, sc.world_size)
    starts = [i * seq_len for i in range(lo, hi)]
    out, _ = _score(
        model, tokens, n_seqs * seq_len, starts, [0] * len(starts), (lo * seq_len, hi * seq_len), sc
    )
    return out


@torch.inference_mode()
def eval_sliding_window(
    model: torch.nn.Module,
    val_tokens,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int = DEFAULT_STRIDE,
    batch_windows: int = DEFAULT_BATCH,
    byte_counter=None,
    rank: int | None = None,
    world_size: int | None = None,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    compile: bool | None = None,
    record_positions: bool = False,
) -> dict:
    """Sliding-window eval (SPEC §8.2): every target scored once, with seq_len - stride tokens of context.

    Windows are split contiguously across ranks. ``record_positions=True`` (tests/debugging) adds
    ``scored_counts`` (int32, times each position was scored, this rank) and ``token_loss`` (fp32 per
    position, NaN where unscored) to the result.
    """
    tokens = _tokens(val_tokens)
    total = tokens.numel() - 1
    sc = _scoring(
        model, seq_len, batch_windows, byte_counter, rank, world_size, device, autocast_dtype, compile
    )
    starts = window_starts(total, seq_len, stride)
    lo, hi = _split(len(starts), sc.rank, sc.world_size)
    mine = starts[lo:hi]
    # The scored ranges of consecutive windows are adjacent, so a rank's targets are one range.
    byte_range = (
        (scored_range(mine[0], total, seq_len, stride)[0], scored_range(mine[-1], total, seq_len, stride)[1])
        if mine
        else (0, 0)
    )
    out, ws = _score(
        model, tokens, total, mine, _first_scored(mine, seq_len, stride), byte_range, sc, record_positions
    )
    out["windows"] = len(starts)
    if record_positions:
        out["scored_counts"], out["token_loss"] = ws.counts.cpu(), ws.token_loss.cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# score-first TTT (SPEC §8.3)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTTConfig:
    """Score-first TTT's settings; the defaults are the record's (see ttt_score_first)."""

    seq_len: int = DEFAULT_SEQ_LEN
    stride: int = DEFAULT_STRIDE
    chunk_tokens: int = TTT_CHUNK_TOKENS
    epochs: int = TTT_EPOCHS
    lr: float = TTT_LR
    momentum: float = TTT_MOMENTUM
    grad_clip: float = TTT_GRAD_CLIP
    batch_seqs: int = DEFAULT_BATCH  # training sequences per SGD step (over all ranks)
    batch_windows: int = DEFAULT_BATCH  # scoring windows per forward
    hash_embed: bool = True
    hash_embed_size: int | None = None  # None: the model config's


# Columns of the per-chunk sums (float64 on the device, all-reduced once at the end).
_LOSS_SUM, _TOKENS, _BYTES = range(3)


def ttt_score_first(
    model: torch.nn.Module,
    val_tokens,
    byte_counter=None,
    config: TTTConfig = TTTConfig(),
    rank: int | None = None,
    world_size: int | None = None,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    compile: bool | None = None,
) -> dict:
    """Legal score-first test-time training over the sliding windows (the record's reported number).

    The stream is cut into chunks of ``chunk_tokens`` predicted positions; each window belongs to the
    chunk holding its first scored position. For chunk ci: (1) score its windows (eval mode, no_grad,
    each rank a contiguous slice); (2) unless ci is the last chunk, train on the chunk: the
    ⌊chunk_len / seq_len⌋ disjoint sequences starting at the chunk start (targets end at chunk_end, all
    already scored), split across ranks, ``batch_seqs`` per step, ``epochs`` passes, SGD (momentum
    0.9, no weight decay, one optimizer so momentum persists across chunks) at
    lr·0.5·(1 + cos(π·ci/(n_chunks − 1))), gradients all-reduced (mean over ranks with data), clipped
    to ``grad_clip``. Every parameter trains, plus the zero-initialised hash embedding (created here
    when ``hash_embed``, removed at the end, so it never reaches an artifact). Settings: ``config``.

    The model's weights are changed in place: reload the artifact before anything else uses it.
    With chunk_tokens and seq_len multiples of stride and chunk_tokens >= seq_len (the record: 32,768,
    2,048, 64), each chunk's scored positions are exactly its own, so a chunk's score depends only on
    tokens up to its end. Returns the metrics, per-chunk sums (chunk_loss_sum, chunk_tokens_scored,
    chunk_bytes), n_chunks, train_steps, and the phase times score_s / train_s.
    """
    c = config
    seq_len, stride, chunk_tokens, batch_seqs = c.seq_len, c.stride, c.chunk_tokens, c.batch_seqs
    tokens = _tokens(val_tokens)
    total = tokens.numel() - 1
    sc = _scoring(
        model, seq_len, c.batch_windows, byte_counter, rank, world_size, device, autocast_dtype, compile
    )
    rank, world_size, device = sc.rank, sc.world_size, sc.device
    if chunk_tokens <= 0 or c.epochs < 0 or batch_seqs <= 0:
        raise ValueError(
            "need chunk_tokens > 0, epochs >= 0, batch_seqs > 0 "
            f"(got {chunk_tokens}, {c.epochs}, {batch_seqs})"
        )
    starts = window_starts(total, seq_len, stride)
    n_chunks = (total + chunk_tokens - 1) // chunk_tokens
    chunk_windows: list[list[int]] = [[] for _ in range(n_chunks)]
    for ws in starts:
        ci = min(scored_range(ws, total, seq_len, stride)[0] // chunk_tokens, n_chunks - 1)
        chunk_windows[ci].append(ws)

    tokens_dev = tokens.to(device)
    was_training = model.training
    saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    if c.hash_embed:
        model.enable_hash_embedding(c.hash_embed_size)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=0.0)
    scorer = make_scorer(model, sc.compile)
    per_chunk = torch.zeros(n_chunks, 3, dtype=torch.float64, device=device)  # columns _LOSS_SUM, ...
    score_s = train_s = 0.0
    train_steps = 0
    _sync(device)
    t_start = time.perf_counter()
    try:
        for ci in range(n_chunks):
            # 1. score (fixed before any update that depends on these tokens)
            t0 = time.perf_counter()
            model.eval()
            lo, hi = _split(len(chunk_windows[ci]), rank, world_size)
            mine = chunk_windows[ci][lo:hi]
            with torch.no_grad():
                ws = _WindowScorer(scorer, tokens_dev, total, sc, False)
                ws.score(mine, _first_scored(mine, seq_len, stride))
                per_chunk[ci, _LOSS_SUM] = ws.loss_sum
                per_chunk[ci, _TOKENS] = ws.n_tokens
                if mine:
                    per_chunk[ci, _BYTES] = float(
                        _count_bytes(
                            byte_counter,
                            tokens,
                            scored_range(mine[0], total, seq_len, stride)[0],
                            scored_range(mine[-1], total, seq_len, stride)[1],
                        )
                    )
            _sync(device)
            t1 = time.perf_counter()
            score_s += t1 - t0
            # 2. adapt on the chunk just scored (never on the last one)
            if ci == n_chunks - 1 or c.epochs == 0:
                continue
            chunk_start, chunk_end = ci * chunk_tokens, min((ci + 1) * chunk_tokens, total)
            n_seqs = (chunk_end - chunk_start) // seq_len
            if n_seqs == 0:
                continue
            lr_ci = c.lr * 0.5 * (1.0 + math.cos(math.pi * ci / (n_chunks - 1)))
            for group in optimizer.param_groups:
                group["lr"] = lr_ci
            shares = [_split(n_seqs, r, world_size) for r in range(world_size)]
            s_lo, s_hi = shares[rank]
            steps_per_epoch = math.ceil(math.ceil(n_seqs / world_size) / batch_seqs)  # same on all ranks
            model.train()
            for _ in range(c.epochs):
                for step in range(steps_per_epoch):
                    b0 = s_lo + step * batch_seqs
                    b1 = min(b0 + batch_seqs, s_hi)
                    # The last target is chunk_start + b1 * seq_len <= chunk_end: already scored.
                    seqs = (
                        tokens_dev[chunk_start + b0 * seq_len : chunk_start + b1 * seq_len + 1]
                        if b1 > b0
                        else None
                    )
                    ranks_with_data = sum(lo + step * batch_seqs < hi for lo, hi in shares)
                    _ttt_step(model, params, optimizer, seqs, c.grad_clip, ranks_with_data, sc)
                    train_steps += 1
            _sync(device)
            train_s += time.perf_counter() - t1
    finally:
        if c.hash_embed:
            model.disable_hash_embedding()
        for p, flag in saved_requires_grad:
            p.requires_grad_(flag)
        model.train(was_training)
    _all_reduce_(per_chunk, world_size)
    totals = per_chunk.sum(0).tolist()
    out = _result(
        totals[_LOSS_SUM],
        int(totals[_TOKENS]),
        int(totals[_BYTES]),
        time.perf_counter() - t_start,
        byte_counter is not None,
    )
    cpu = per_chunk.cpu()
    out.update(
        n_chunks=n_chunks,
        windows=len(starts),
        train_steps=train_steps,
        score_s=score_s,
        train_s=train_s,
        chunk_loss_sum=cpu[:, _LOSS_SUM].tolist(),
        chunk_tokens_scored=[int(v) for v in cpu[:, _TOKENS].tolist()],
        chunk_bytes=[int(v) for v in cpu[:, _BYTES].tolist()],
    )
    return out


def _ttt_step(
    model, params, optimizer, seqs: Tensor | None, grad_clip, ranks_with_data, sc: _Scoring
) -> None:
    """One SGD step on this rank's training sequences ``seqs`` (seq_len + 1 tokens per sequence, the
    last target included; None when this rank has none at this step)."""
    optimizer.zero_grad(set_to_none=False)
    if seqs is not None:
        x = seqs[:-1].reshape(-1, sc.seq_len)
        y = seqs[1:].reshape(-1, sc.seq_len)
        with _autocast(sc.device, sc.autocast_dtype):
            loss = model(x, y)
        loss.backward()
    world_size = sc.world_size
    if world_size > 1 and initialized():
        # Mean over the ranks that had sequences (all of them in the record: 16 seqs over 8 ranks): a
        # rank without data contributes zeros to one all-reduce per dtype, and the mean is rescaled.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        average_gradients(grads)
        if 0 < ranks_with_data < world_size:
            torch._foreach_mul_(grads, world_size / ranks_with_data)
    elif seqs is None:
        return
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
