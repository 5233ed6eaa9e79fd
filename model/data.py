"""Tokens on disk: the challenge's shard format, the train sampler and validation stream, the FineWeb
downloader and the embedded default corpus (SPEC.md section 2, 8.1).

Commands::

    python -m model.data build-corpus --vocab-size 8192        # embedded corpus, no network (~15 s)
    python -m model.data download --variant sp8192 --train-shards 80 --dest data   # needs the HF hub
    python -m model.data validate data/datasets/fineweb10B_sp8192/*.bin

Shard format (SPEC 2.1): a header of 256 little-endian int32 (magic 20240520, version 1, token count N,
zeros) followed by N little-endian uint16 tokens; the file is exactly 1024 + 2N bytes.

Train sampler (SPEC 2.3) follows the record's ``ShuffledSequenceLoader`` except for its seed: the record
seeds its generator with the rank only (every SEED sees the same data order); ours is seeded by
``SeedSequence([seed, rank])`` so that different seeds also see different data. ``seed=0`` is *not* the
record's stream either (the record used ``PCG64(rank)``); pass ``record_seeding=True`` for that.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Shards (SPEC 2.1)
# ----------------------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # the token count is an int32 header word
TOKEN_LIMIT = 2**16  # uint16 payload

_FIX_HINT = (
    "delete it and fetch it again (python -m model.data download ...) or rebuild it "
    "(python -m model.data build-corpus ...)"
)


class ShardError(ValueError):
    """A shard file that is not a valid challenge shard; the message names the file and the fix."""


def _shard_error(path: str | os.PathLike, problem: str, fix: str = _FIX_HINT) -> ShardError:
    return ShardError(f"shard {os.fspath(path)}: {problem}; {fix}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_path(path: Path) -> Path:
    # Same directory (so the rename is atomic), hidden, unique per process and call; mkstemp makes it
    # 0600, give it the permissions a plain open() would.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _as_numpy_tokens(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens).reshape(-1)


def write_shard(path: str | os.PathLike, tokens) -> Path:
    """Write ``tokens`` (any integer array-like, numpy or torch) as a challenge shard, atomically."""
    path = Path(path)
    arr = _as_numpy_tokens(tokens)
    if arr.size and arr.dtype != np.uint16:
        if not np.issubdtype(arr.dtype, np.integer):
            raise _shard_error(path, f"tokens must be integers, got dtype {arr.dtype}", "pass token ids")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= TOKEN_LIMIT:
            bad = lo if lo < 0 else hi
            where = int(np.flatnonzero(arr == bad)[0])
            raise _shard_error(
                path,
                f"token {bad} at index {where} does not fit uint16 (0..{TOKEN_LIMIT - 1})",
                "the shard format holds vocabularies of at most 65,536 ids",
            )
    if arr.size > MAX_SHARD_TOKENS:
        raise _shard_error(
            path, f"{arr.size:,} tokens exceed the {MAX_SHARD_TOKENS:,} a shard can hold", "split the tokens"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    return path


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate the header and the file size of a shard; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise _shard_error(path, "file not found") from None
    except IsADirectoryError:
        raise _shard_error(path, "is a directory, not a shard file", "pass a .bin file") from None
    if len(raw) < HEADER_BYTES:
        raise _shard_error(path, f"truncated: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, n = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise _shard_error(path, f"wrong magic {magic} (expected {SHARD_MAGIC}): not a challenge shard")
    if version != SHARD_VERSION:
        raise _shard_error(path, f"unsupported version {version} (expected {SHARD_VERSION})")
    if n < 0:
        raise _shard_error(path, f"negative token count {n} in the header")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        what = "truncated (short read)" if size < expected else "has trailing bytes"
        raise _shard_error(
            path, f"size mismatch: header says {n:,} tokens = {expected:,} bytes, file has {size:,} ({what})"
        )
    return n


def read_shard(path: str | os.PathLike, *, mmap: bool = True) -> np.ndarray:
    """Tokens of a shard as a uint16 array: a read-only memory map by default, else read into memory."""
    path = Path(path)
    n = read_shard_header(path)
    if mmap:
        if n == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(path, mode="r", dtype="<u2", offset=HEADER_BYTES, shape=(n,))
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if tokens.size != n:
        raise _shard_error(path, f"short read: {tokens.size:,} of {n:,} tokens")
    return tokens.astype(np.uint16, copy=False)


def validate_shard(path: str | os.PathLike, *, vocab_size: int | None = None) -> int:
    """Header, size and (with ``vocab_size``) every token id < vocab_size; returns the token count."""
    n = read_shard_header(path)
    if vocab_size is not None and n:
        hi = int(read_shard(path).max())
        if hi >= vocab_size:
            raise _shard_error(
                path, f"token id {hi} >= vocab size {vocab_size}", "use the matching tokenizer"
            )
    return n


def resolve_shards(
    files: str | os.PathLike | Sequence[str | os.PathLike], what: str = "shards"
) -> list[Path]:
    """A glob pattern, a file, or a list of files -> sorted list of existing paths (error if none)."""
    if isinstance(files, (str, os.PathLike)):
        pattern = os.fspath(files)
        paths = sorted(Path(p) for p in glob.glob(pattern))
        if not paths and Path(pattern).is_file():
            paths = [Path(pattern)]
    else:
        paths = [Path(p) for p in files]
        pattern = ", ".join(map(str, paths[:3])) + (" ..." if len(paths) > 3 else "")
    if not paths:
        raise FileNotFoundError(
            f"no {what} match {pattern!r}: build the embedded corpus (python -m model.data build-corpus) "
            "or download FineWeb (python -m model.data download --variant sp8192)"
        )
    return paths


# ----------------------------------------------------------------------------------------------------------
# Train sampler (SPEC 2.3) and validation stream (SPEC 8.1)
# ----------------------------------------------------------------------------------------------------------


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
                f"{files!r}; download more (--train-shards >= {world_size}) or run on fewer ranks"
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


def load_val_tokens(files: str | os.PathLike | Sequence[str | os.PathLike], seq_len: int) -> torch.Tensor:
    """All validation shards concatenated, cut to usable+1 tokens with usable = floor((N-1)/seq_len)*seq_len
    (SPEC 8.1). Returns a uint16 CPU tensor; ``usable`` = len - 1 tokens are predicted."""
    paths = resolve_shards(files, "validation shards")
    tokens = np.concatenate([read_shard(p, mmap=False) for p in paths])
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(
            f"validation shards {[str(p) for p in paths]} hold {tokens.size} tokens, fewer than "
            f"seq_len+1 = {seq_len + 1}: use a shorter eval seq_len or a larger validation split"
        )
    return torch.from_numpy(np.ascontiguousarray(tokens[: usable + 1]))


# ----------------------------------------------------------------------------------------------------------
# Where the data is: one record that train.py reads
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPaths:
    dataset_dir: Path
    tokenizer_model: Path
    vocab_size: int
    source: str  # "stdlib" (embedded corpus) or "fineweb"
    fingerprint: str | None = None  # sha256 of the corpus text (embedded corpus only)
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def train_pattern(self) -> str:
        return str(self.dataset_dir / "fineweb_train_*.bin")

    @property
    def val_pattern(self) -> str:
        return str(self.dataset_dir / "fineweb_val_*.bin")

    def train_files(self) -> list[Path]:
        return resolve_shards(self.train_pattern, "train shards")

    def val_files(self) -> list[Path]:
        return resolve_shards(self.val_pattern, "validation shards")

    def describe(self) -> dict:
        return {
            "source": self.source,
            "dataset_dir": str(self.dataset_dir),
            "train_pattern": self.train_pattern,
            "val_pattern": self.val_pattern,
            "tokenizer_model": str(self.tokenizer_model),
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            **self.meta,
        }


# ----------------------------------------------------------------------------------------------------------
# FineWeb downloader (the challenge's manifest-driven layout, SPEC 2.2)
# ----------------------------------------------------------------------------------------------------------

# The record's data lives in kevclark/parameter-golf (its README sets MATCHED_FINEWEB_REPO_ID to it); the
# challenge's own default repo holds the older variants.
DEFAULT_REPO_IDS = {"sp8192": "kevclark/parameter-golf"}
CHALLENGE_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"


class DownloadError(RuntimeError):
    """A remote file is missing, or arrived with the wrong size or content."""


class Remote(Protocol):
    """Where challenge files come from. Paths are posix paths relative to the repository root."""

    def sizes(self, paths: Sequence[str]) -> dict[str, int | None]: ...

    def fetch(self, path: str, dest: Path) -> None: ...


class HubRemote:
    """A Hugging Face dataset repository (production)."""

    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision

    def sizes(self, paths: Sequence[str]) -> dict[str, int | None]:
        from huggingface_hub import HfApi

        found = HfApi().get_paths_info(self.repo_id, list(paths), repo_type="dataset", revision=self.revision)
        sizes: dict[str, int | None] = dict.fromkeys(paths)
        sizes.update({f.path: getattr(f, "size", None) for f in found})
        return sizes

    def fetch(self, path: str, dest: Path) -> None:
        from huggingface_hub import hf_hub_download

        cached = Path(
            hf_hub_download(self.repo_id, filename=path, repo_type="dataset", revision=self.revision)
        ).resolve(strict=True)
        try:  # the HF cache holds the blob already; a hard link costs no space
            dest.unlink(missing_ok=True)
            os.link(cached, dest)
        except OSError:
            shutil.copyfile(cached, dest)

    def __repr__(self) -> str:
        return f"HubRemote({self.repo_id!r})"


class LocalDirRemote:
    """A local folder laid out like the hub repository (a mirror, or a test's fake hub)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def sizes(self, paths: Sequence[str]) -> dict[str, int | None]:
        return {p: (self.root / p).stat().st_size if (self.root / p).is_file() else None for p in paths}

    def fetch(self, path: str, dest: Path) -> None:
        src = self.root / path
        if not src.is_file():
            raise DownloadError(f"{path} is not in {self.root}")
        shutil.copyfile(src, dest)

    def __repr__(self) -> str:
        return f"LocalDirRemote({str(self.root)!r})"


def _check_file(path: Path, expected_size: int | None, kind: str | None = None) -> str | None:
    """Why a local copy is unusable, or None when it is good; ``kind`` (a suffix) defaults to path's."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size {size:,} != remote size {expected_size:,}"
    kind = kind or path.suffix
    if kind == ".bin":
        try:
            read_shard_header(path)
        except ShardError as e:
            return str(e).split(": ", 1)[1]
    elif kind == ".model":
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            return f"not a SentencePiece model ({e})"
    elif kind == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            return f"invalid JSON ({e})"
    return None


def _fetch_verified(remote: Remote, rpath: str, dest: Path, expected_size: int | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dest)
    try:
        try:
            remote.fetch(rpath, tmp)
        except DownloadError:
            raise
        except Exception as e:
            raise DownloadError(f"fetching {rpath} from {remote!r} failed: {e}") from e
        problem = _check_file(tmp, expected_size, dest.suffix)
        if problem:
            raise DownloadError(
                f"{rpath} from {remote!r} is bad ({problem}); nothing was written to {dest}. Re-run the "
                "download; if it persists the remote copy is corrupt"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_fineweb(
    dest: str | os.PathLike,
    *,
    variant: str = "sp8192",
    train_shards: int = 80,
    remote: Remote | None = None,
    repo_id: str | None = None,
    remote_root: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DataPaths:
    """Fetch manifest.json, every validation shard, the first ``train_shards`` train shards and the
    tokenizer into ``dest`` (``dest/datasets/fineweb10B_<variant>/``, ``dest/tokenizers/``).

    Resumable: files already present with the remote size and a valid header are skipped; bad ones are
    fetched again. Every fetched file is checked (size, shard header, tokenizer loads) before it is
    renamed into place. ``remote`` defaults to the HF dataset ``repo_id`` (env MATCHED_FINEWEB_REPO_ID,
    else the record's repo for sp8192 / the challenge's otherwise), under ``remote_root`` (env
    MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, default "datasets").
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if train_shards < 0:
        raise ValueError(f"train_shards must be >= 0, got {train_shards}")
    if remote is None:
        repo_id = (
            repo_id
            or os.environ.get("MATCHED_FINEWEB_REPO_ID")
            or DEFAULT_REPO_IDS.get(variant, CHALLENGE_REPO_ID)
        )
        remote = HubRemote(repo_id)
    if remote_root is None:
        remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    prefix = remote_root.strip("/") + "/" if remote_root.strip("/") else ""
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))

    # The manifest is small and may change upstream: always take a fresh copy (a stale one is the
    # challenge README's known pitfall).
    _fetch_verified(remote, prefix + "manifest.json", dest / "manifest.json", None)
    manifest = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
    dataset_dir = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"{dataset_dir} is not in {remote!r} {prefix}manifest.json (it lists {names})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise ValueError(f"{variant} has {n_train} train shards on {remote!r}; {train_shards} were requested")
    tok_entry = next(
        (t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None
    )
    if tok_entry is None:
        raise DownloadError(
            f"tokenizer {entry.get('tokenizer_name')!r} of {dataset_dir} is not in the manifest"
        )
    tok_files = [str(tok_entry[k]) for k in ("model_path", "vocab_path", "path") if tok_entry.get(k)]
    model_file = next((p for p in tok_files if p.endswith(".model")), None)
    if model_file is None:
        raise DownloadError(f"tokenizer entry {tok_entry} names no .model file")

    rel = [f"datasets/{dataset_dir}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    rel += [f"datasets/{dataset_dir}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    rel += tok_files
    sizes = remote.sizes([prefix + r for r in rel])
    total = sum(s or 0 for s in sizes.values())
    fetched = skipped = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"fineweb {variant}", disable=not progress) as bar:
        for r in rel:
            rpath, local = prefix + r, dest / r
            size = sizes.get(rpath)
            problem = _check_file(local, size)
            if problem is None:
                skipped += 1
            else:
                if problem != "missing":
                    say(f"{local}: {problem}; fetching it again")
                _fetch_verified(remote, rpath, local, size)
                fetched += 1
            bar.update(size or local.stat().st_size)

    import sentencepiece as spm

    vocab = int(spm.SentencePieceProcessor(model_file=str(dest / model_file)).vocab_size())
    meta = {
        "remote": repr(remote),
        "train_shards": train_shards,
        "val_shards": n_val,
        "fetched": fetched,
        "skipped": skipped,
    }
    return DataPaths(dest / "datasets" / dataset_dir, dest / model_file, vocab, "fineweb", None, meta)


def fineweb_paths(root: str | os.PathLike = "data", variant: str = "sp8192") -> DataPaths:
    """Paths of an already downloaded FineWeb variant (a clear error says how to fetch it if absent)."""
    import sentencepiece as spm

    root = Path(root)
    dataset_dir = root / "datasets" / f"fineweb10B_{variant}"
    vocab = variant[2:] if variant.startswith("sp") else variant
    model = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not model.is_file() or not list(dataset_dir.glob("fineweb_val_*.bin")):
        raise FileNotFoundError(
            f"FineWeb {variant} is not in {root} (need {model} and {dataset_dir}/fineweb_val_*.bin): run "
            f"python -m model.data download --variant {variant} --dest {root}"
        )
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return DataPaths(dataset_dir, model, int(sp.vocab_size()), "fineweb")


# ----------------------------------------------------------------------------------------------------------
# Embedded default corpus: English that ships with every Python
# ----------------------------------------------------------------------------------------------------------

# Bump when anything below changes the built files (it is part of the fingerprint and the cache key).
CORPUS_BUILDER_VERSION = "stdlib-corpus-v1"
VAL_FRACTION = 0.05
CORPUS_TRAIN_SHARDS = 8  # so that files[rank::world_size] is non-empty up to 8 ranks
TRAINER_MAX_SENTENCES = 2_000_000  # bounds the tokenizer trainer's input (the corpus has ~11.5K documents)

# The record tokenizer's trainer settings (SPEC 2.2). num_threads is fixed: the trained pieces do not
# depend on it, but the .model file records it, and a fixed value keeps the file byte-identical across
# machines. Training takes < 1 s at vocab 8192 on this corpus (measured), so one thread costs nothing.
SENTENCEPIECE_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
    input_sentence_size=TRAINER_MAX_SENTENCES,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class StdlibCorpus:
    """Documents = the pydoc topics (``pydoc_data.topics``, sorted by name) and every module, class and
    function docstring of the standard library's .py files (sorted by path, in source order), read with
    ``ast`` without importing anything. Exact duplicates are dropped; the documents are then put in a
    fixed pseudo-random order (sorted by sha256 of index and text), like FineWeb's pre-shuffled docs.

    ``max_files`` keeps only the first N source files (tests use small slices).
    """

    def __init__(self, stdlib_dir: str | os.PathLike | None = None, max_files: int | None = None):
        self.stdlib_dir = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
        self.max_files = max_files

    def source_files(self) -> list[Path]:
        files = []
        for dirpath, dirnames, filenames in os.walk(self.stdlib_dir):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
        files.sort(key=lambda p: p.relative_to(self.stdlib_dir).as_posix())
        return files[: self.max_files] if self.max_files is not None else files

    def source_key(self) -> str:
        """Cheap key (interpreter, paths, sizes, mtimes) that maps to a fingerprint without parsing."""
        h = hashlib.sha256(
            f"{CORPUS_BUILDER_VERSION}|{sys.version}|{self.stdlib_dir}|{self.max_files}".encode()
        )
        from pydoc_data import topics

        h.update(f"|{topics.__file__}|{Path(topics.__file__).stat().st_size}".encode())
        for p in self.source_files():
            st = p.stat()
            h.update(f"|{p.relative_to(self.stdlib_dir).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def documents(self, progress: bool = False) -> list[str]:
        from pydoc_data import topics

        from tqdm.auto import tqdm

        docs = [topics.topics[k] for k in sorted(topics.topics)]
        for path in tqdm(self.source_files(), desc="stdlib docstrings", unit="file", disable=not progress):
            docs += _docstrings(path)
        seen: set[str] = set()
        unique = []
        for d in docs:
            d = d.replace("\x00", " ").strip()
            if d and d not in seen:
                seen.add(d)
                unique.append(d)
        keys = [hashlib.sha256(f"{i}\x00{d}".encode()).digest() for i, d in enumerate(unique)]
        return [d for _, d in sorted(zip(keys, unique))]


def _docstrings(path: Path) -> list[str]:
    try:
        src = path.read_bytes()
        with warnings.catch_warnings():  # invalid escapes in old test data warn; they are not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(src, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []  # the stdlib ships a few deliberately broken files (lib2to3 / test data)
    out, stack = [], [tree]
    while stack:  # pre-order = source order
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return out


def corpus_fingerprint(documents: Sequence[str]) -> str:
    """sha256 over the builder version and the length-prefixed UTF-8 documents, in order."""
    h = hashlib.sha256(CORPUS_BUILDER_VERSION.encode())
    for d in documents:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model (serialized) trained with the record tokenizer's settings (SPEC 2.2)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(documents)),
        model_writer=buf,
        vocab_size=vocab_size,
        **SENTENCEPIECE_SETTINGS,
    )
    return buf.getvalue()


def build_corpus(
    out_dir: str | os.PathLike,
    documents: Sequence[str],
    vocab_size: int,
    *,
    val_fraction: float = VAL_FRACTION,
    train_shards: int = CORPUS_TRAIN_SHARDS,
    progress: bool = False,
) -> DataPaths:
    """Train the tokenizer on ``documents`` and write challenge-format shards under ``out_dir``:
    ``tokenizers/golfbench_stdlib_<V>_bpe.model`` and ``datasets/stdlib_sp<V>/fineweb_{val,train}_*.bin``.
    Documents are written as [BOS] + tokens (no EOS); the first ceil(val_fraction * docs) are the
    validation split (the challenge's layout), the rest are split over ``train_shards`` files of nearly
    equal token counts (a document may straddle two). Same inputs -> byte-identical files."""
    import sentencepiece as spm
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    n_val = max(1, int(np.ceil(val_fraction * len(documents))))
    if len(documents) < n_val + 1:
        raise ValueError(f"need at least 2 documents for a val and a train split, got {len(documents)}")
    steps = tqdm(total=3, desc=f"corpus sp{vocab_size}", disable=not progress)
    t0 = time.perf_counter()
    model = train_tokenizer(documents, vocab_size)
    steps.update()
    sp = spm.SentencePieceProcessor(model_proto=model)
    encoded = sp.encode(list(documents), num_threads=os.cpu_count() or 1)
    steps.update()
    bos = sp.bos_id()

    def stream(docs: Sequence[list[int]]) -> np.ndarray:
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        out = np.empty(int(lengths.sum()), dtype=np.uint16)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[starts] = bos
        flat = np.fromiter(
            (t for d in docs for t in d), dtype=np.uint16, count=int(lengths.sum()) - len(docs)
        )
        mask = np.ones(out.size, dtype=bool)
        mask[starts] = False
        out[mask] = flat
        return out

    val, train = stream(encoded[:n_val]), stream(encoded[n_val:])
    data_dir = out_dir / "datasets" / f"stdlib_sp{vocab_size}"
    tok_path = out_dir / "tokenizers" / f"golfbench_stdlib_{vocab_size}_bpe.model"
    with atomic_write(tok_path) as f:
        f.write(model)
    write_shard(data_dir / "fineweb_val_000000.bin", val)
    for i, part in enumerate(np.array_split(train, train_shards)):
        write_shard(data_dir / f"fineweb_train_{i:06d}.bin", part)
    steps.update()
    steps.close()
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    meta = {
        "documents": len(documents),
        "val_documents": n_val,
        "text_bytes": text_bytes,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "tokens": int(train.size + val.size),
        "bytes_per_token": round(text_bytes / max(1, train.size + val.size - len(documents)), 4),
        "train_shards": train_shards,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    return DataPaths(data_dir, tok_path, int(sp.vocab_size()), "stdlib", corpus_fingerprint(documents), meta)


def default_cache_dir() -> Path:
    return Path(os.environ.get("GOLFBENCH_CACHE") or Path.home() / ".cache" / "golfbench")


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (POSIX flock), so concurrent ranks build once and wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: the atomic directory rename below still keeps the cache sound
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _paths_from_meta(build_dir: Path) -> DataPaths | None:
    meta_path = build_dir / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    paths = DataPaths(
        build_dir / meta.pop("dataset_dir"),
        build_dir / meta.pop("tokenizer_model"),
        int(meta.pop("vocab_size")),
        "stdlib",
        meta.pop("fingerprint"),
        meta,
    )
    if not paths.tokenizer_model.is_file() or not list(paths.dataset_dir.glob("fineweb_*.bin")):
        return None
    return paths


def _load_documents(path: Path, fingerprint: str) -> list[str] | None:
    try:
        documents = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError):
        return None
    return documents if corpus_fingerprint(documents) == fingerprint else None


def ensure_corpus(
    vocab_size: int,
    corpus: StdlibCorpus | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DataPaths:
    """Build the embedded corpus for ``vocab_size`` once and return its paths (instant when cached).

    Cache layout: ``<cache>/stdlib-corpus/<fingerprint[:16]>/sp<V>/`` (meta.json, tokenizers/, datasets/),
    plus ``<cache>/stdlib-corpus/sources/<source key>.json`` mapping this interpreter's stdlib to its
    fingerprint without parsing it again. Builds go to a temporary directory renamed into place, under a
    file lock, so concurrent processes (torchrun ranks) build once and never see half-written files.
    """
    corpus = corpus or StdlibCorpus()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / "stdlib-corpus"
    source_file = root / "sources" / f"{corpus.source_key()}.json"
    if source_file.is_file():
        fp = json.loads(source_file.read_text(encoding="utf-8"))["fingerprint"]
        cached = _paths_from_meta(root / fp[:16] / f"sp{vocab_size}")
        if cached is not None:
            return cached
    with _file_lock(root / "build.lock"):
        if source_file.is_file():  # another process may have built it while we waited
            fp = json.loads(source_file.read_text(encoding="utf-8"))["fingerprint"]
            cached = _paths_from_meta(root / fp[:16] / f"sp{vocab_size}")
            if cached is not None:
                return cached
        documents = None
        if source_file.is_file():  # known stdlib, new vocab size: reuse its extracted documents
            fp = json.loads(source_file.read_text(encoding="utf-8"))["fingerprint"]
            documents = _load_documents(root / fp[:16] / "documents.json.gz", fp)
        if documents is None:
            documents = corpus.documents(progress=progress)
            fp = corpus_fingerprint(documents)
            with atomic_write(root / fp[:16] / "documents.json.gz") as f:
                f.write(gzip.compress(json.dumps(documents).encode("utf-8"), mtime=0))
        final = root / fp[:16] / f"sp{vocab_size}"
        cached = _paths_from_meta(final)
        if cached is None:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".sp{vocab_size}.", dir=final.parent))
            os.chmod(tmp, 0o777 & ~_umask())
            try:
                built = build_corpus(tmp, documents, vocab_size, progress=progress)
                meta = {
                    "dataset_dir": built.dataset_dir.relative_to(tmp).as_posix(),
                    "tokenizer_model": built.tokenizer_model.relative_to(tmp).as_posix(),
                    "vocab_size": built.vocab_size,
                    "fingerprint": fp,
                    "python": sys.version.split()[0],
                    "builder": CORPUS_BUILDER_VERSION,
                    **built.meta,
                }
                with atomic_write(tmp / "meta.json", "w") as f:
                    json.dump(meta, f, indent=2, sort_keys=True)
                if final.exists():  # an unreadable leftover: replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            cached = _paths_from_meta(final)
            assert cached is not None, f"corpus build in {final} left no usable meta.json"
        with atomic_write(source_file, "w") as f:
            json.dump({"fingerprint": fp, "stdlib": str(corpus.stdlib_dir), "python": sys.version}, f)
        return cached


def ensure_default_corpus(
    vocab_size: int = 8192, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> DataPaths:
    """The embedded default corpus (whole standard library) for ``vocab_size``; see ``ensure_corpus``."""
    return ensure_corpus(vocab_size, StdlibCorpus(), cache_dir=cache_dir, progress=progress)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser(
        "download", help="fetch FineWeb shards + tokenizer from the HF hub (or a local mirror)"
    )
    d.add_argument("--variant", default="sp8192", help="tokenizer family, e.g. sp8192 (default), sp1024")
    d.add_argument("--train-shards", type=int, default=80, help="first N train shards (default 80, as #1523)")
    d.add_argument("--dest", default="data", help="destination folder (default ./data)")
    d.add_argument(
        "--repo-id",
        default=None,
        help="HF dataset repo (default: env MATCHED_FINEWEB_REPO_ID or "
        f"{DEFAULT_REPO_IDS['sp8192']} for sp8192)",
    )
    d.add_argument(
        "--remote-root",
        default=None,
        help="folder in the repo (default: env "
        f"MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or {DEFAULT_REMOTE_ROOT!r})",
    )
    d.add_argument("--from-dir", default=None, help="copy from a local folder laid out like the hub repo")
    c = sub.add_parser("build-corpus", help="build the embedded stdlib corpus (no network)")
    c.add_argument("--vocab-size", type=int, default=8192)
    c.add_argument("--cache-dir", default=None, help="default: env GOLFBENCH_CACHE or ~/.cache/golfbench")
    v = sub.add_parser("validate", help="check shard files (header, size, token range)")
    v.add_argument("files", nargs="+")
    v.add_argument("--vocab-size", type=int, default=None)
    args = parser.parse_args(argv)

    if args.cmd == "download":
        remote = LocalDirRemote(args.from_dir) if args.from_dir else None
        paths = download_fineweb(
            args.dest,
            variant=args.variant,
            train_shards=args.train_shards,
            remote=remote,
            repo_id=args.repo_id,
            remote_root=args.remote_root,
        )
        print(json.dumps(paths.describe(), indent=2))
    elif args.cmd == "build-corpus":
        paths = ensure_corpus(args.vocab_size, StdlibCorpus(), cache_dir=args.cache_dir)
        print(json.dumps(paths.describe(), indent=2))
    else:
        bad = 0
        for f in args.files:
            try:
                print(f"{f}: {validate_shard(f, vocab_size=args.vocab_size):,} tokens")
            except ShardError as e:
                bad += 1
                print(e, file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
