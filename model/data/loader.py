"""The train sampler (SPEC.md 2.3), the validation stream (SPEC 8.1), and one rank's micro-batches.

The sampler follows the record's ``ShuffledSequenceLoader`` except for its seed: the record seeds its
generator with the rank only (every SEED sees the same data order); ours is seeded by
``SeedSequence([seed, rank])`` so that different seeds also see different data. ``seed=0`` is *not* the
record's stream either (the record used ``PCG64(rank)``); pass ``record_seeding=True`` for that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .shards import check_token_ids, describe_files, read_shard, read_shard_header, resolve_shards


class ShuffledSequenceLoader:
    """Random seq_len+1 windows from the rank's own shards (``files[rank::world_size]``), memory-mapped.

    Per shard: a random phase in [0, min(seq_len-1, n-seq_len-1)] and the starts ``phase + k*seq_len`` in a
    random permutation, popped from the end; per sequence a shard is drawn with probability proportional to
    its remaining starts; when all are used, every shard is re-phased and re-permuted (a new epoch).
    The generator is ``PCG64(SeedSequence([seed, rank]))`` (record: ``PCG64(rank)``, see module docstring).

    ``state_dict()`` is small (generator states and one count per shard) and ``load_state_dict`` continues
    the exact stream: the shards' permutations are regenerated from the generator state at the start of
    the current epoch and truncated to the saved counts.
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        record_seeding: bool = False,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        all_files = resolve_shards(files, "train shards")
        self.files = all_files[rank::world_size]
        if not self.files:
            raise ValueError(
                f"rank {rank} of {world_size} gets no train shard: only {len(all_files)} shard(s) match "
                f"{describe_files(files)!r}; download more (--train-shards >= {world_size}) or run on fewer "
                "ranks"
            )
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.record_seeding = record_seeding
        bitgen = (
            np.random.PCG64(rank) if record_seeding else np.random.PCG64(np.random.SeedSequence([seed, rank]))
        )
        self.rng = np.random.Generator(bitgen)
        self.num_tokens = [read_shard_header(f) for f in self.files]
        if max(self.num_tokens) < seq_len + 1:
            raise ValueError(
                f"rank {rank}: no train shard holds seq_len+1 = {seq_len + 1} tokens "
                f"(largest has {max(self.num_tokens)}): use a shorter seq_len or more data"
            )
        self._maps: dict[int, np.ndarray] = {}
        self.epoch = -1
        self.sequences = 0  # drawn since construction (for logs)
        self._new_epoch()

    def _reset_shard(self, si: int) -> None:
        n, L = self.num_tokens[si], self.seq_len
        max_phase = min(L - 1, max(0, n - L - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        num_seq = max(0, (n - 1 - phase) // L)
        self.start_inds[si] = (phase + self.rng.permutation(num_seq) * L).tolist()

    def _new_epoch(self) -> None:
        self._epoch_rng_state = self.rng.bit_generator.state
        self.start_inds: list[list[int]] = [[] for _ in self.files]
        for si in range(len(self.files)):
            self._reset_shard(si)
        self.epoch += 1

    def _shard(self, si: int) -> np.ndarray:
        mm = self._maps.get(si)
        if mm is None:
            mm = self._maps[si] = read_shard(self.files[si])
        return mm

    def next_batch(self, batch_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 CPU tensors of shape (batch_seqs, seq_len), y = x shifted by one token."""
        L = self.seq_len
        window = np.empty((batch_seqs, L + 1), dtype=np.int64)
        remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
        for bi in range(batch_seqs):
            total = remaining.sum()
            if total <= 0:
                self._new_epoch()
                remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
                total = remaining.sum()
            si = int(self.rng.choice(len(self.files), p=remaining / total))
            start = self.start_inds[si].pop()
            remaining[si] -= 1
            window[bi] = self._shard(si)[start : start + L + 1]
        self.sequences += batch_seqs
        w = torch.from_numpy(window)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "files": [f.name for f in self.files],
            "seq_len": self.seq_len,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "record_seeding": self.record_seeding,
            "epoch": self.epoch,
            "sequences": self.sequences,
            "epoch_rng": self._epoch_rng_state,
            "rng": self.rng.bit_generator.state,
            "remaining": [len(s) for s in self.start_inds],
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("version", "files", "seq_len", "seed", "rank", "world_size", "record_seeding"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state does not match this loader: {key} is {state.get(key)!r} in the "
                    f"checkpoint, {mine[key]!r} here; resume with the same data, seq_len, seed and world size"
                )
        self.rng.bit_generator.state = state["epoch_rng"]
        self._new_epoch()
        for si, rem in enumerate(state["remaining"]):
            if rem > len(self.start_inds[si]):
                raise ValueError(
                    f"loader state: shard {self.files[si]} has {rem} starts left, can't be resumed"
                )
            del self.start_inds[si][rem:]
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.sequences = state["epoch"], state["sequences"]


def load_val_tokens(
    files: str | os.PathLike | Sequence[str | os.PathLike], seq_len: int, vocab_size: int | None = None
) -> torch.Tensor:
    """All validation shards concatenated, cut to usable+1 tokens with usable = floor((N-1)/seq_len)*seq_len
    (SPEC 8.1); with ``vocab_size`` every id of every shard is checked to be below it (ShardError naming the
    file and the position). Returns a uint16 CPU tensor; ``usable`` = len - 1 tokens are predicted."""
    paths = resolve_shards(files, "validation shards")
    parts = [read_shard(p, mmap=False) for p in paths]
    if vocab_size is not None:
        for p, part in zip(paths, parts):
            check_token_ids(p, vocab_size, part)
    tokens = np.concatenate(parts)
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(
            f"validation shards {[str(p) for p in paths]} hold {tokens.size} tokens, fewer than "
            f"seq_len+1 = {seq_len + 1}: use a shorter eval seq_len or a larger validation split"
        )
    return torch.from_numpy(np.ascontiguousarray(tokens[: usable + 1]))


class RankBatches:
    """One rank's micro-batches of a training step. Micro-batch j of rank r reads the loader of data rank
    r * accum + j of world * accum, so the token stream depends only on world * accum (8 for the record),
    not on how it is split: one GPU with accumulation 8 sees exactly the batches of 8 GPUs."""

    def __init__(
        self, pattern: str, seq_len: int, micro_seqs: int, *, seed: int, rank: int, world: int, accum: int
    ):
        self.micro_seqs = micro_seqs
        self.loaders = [
            ShuffledSequenceLoader(
                pattern, seq_len, seed=seed, rank=rank * accum + j, world_size=world * accum
            )
            for j in range(accum)
        ]

    def next(self, j: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loaders[j].next_batch(self.micro_seqs)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    def state_dict(self) -> list[dict]:
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.loaders):
            raise ValueError(f"checkpoint has {len(states)} loader states, this run has {len(self.loaders)}")
        for loader, state in zip(self.loaders, states):
            loader.load_state_dict(state)
