"""The challenge's shard format (SPEC.md 2.1): write, read, validate, and find shard files.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count N, zeros)
followed by N little-endian uint16 tokens; the file is exactly 1024 + 2N bytes.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write

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


def check_token_ids(path: str | os.PathLike, vocab_size: int, tokens: np.ndarray | None = None) -> int:
    """Every token id of a shard (or of ``tokens``, read from it) is < vocab_size: a vectorised max over the
    memory map, ~GB/s. Otherwise a ShardError names the file, the first bad id, its position and the
    vocab size. Returns the token count."""
    arr = read_shard(path) if tokens is None else tokens
    if arr.size and int(arr.max()) >= vocab_size:
        bad = arr >= vocab_size
        pos = int(np.argmax(bad))
        raise _shard_error(
            path,
            f"token id {int(arr[pos])} >= vocab size {vocab_size} at position {pos:,} "
            f"({int(bad.sum()):,} of {arr.size:,} ids out of range, the largest {int(arr.max())})",
            "the shard was tokenized for another vocabulary or is damaged: fetch data of a "
            f"{vocab_size}-piece tokenizer (python -m model.data download --variant sp{vocab_size}, or "
            f"build-corpus --vocab-size {vocab_size}), or give the model the data's vocabulary "
            "(--model-vocab-size)",
        )
    return int(arr.size)


def validate_shard(path: str | os.PathLike, *, vocab_size: int | None = None) -> int:
    """Header, size and (with ``vocab_size``) every token id < vocab_size; returns the token count."""
    n = read_shard_header(path)
    if vocab_size is not None and n:
        check_token_ids(path, vocab_size)
    return n


def describe_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """A pattern, a file or a list of files as plain text for a message (no PosixPath reprs)."""
    if isinstance(files, (str, os.PathLike)):
        return os.fspath(files)
    files = [os.fspath(f) for f in files]
    return ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")


def resolve_shards(
    files: str | os.PathLike | Sequence[str | os.PathLike], what: str = "shards", fix: str | None = None
) -> list[Path]:
    """A glob pattern, a file, or a list of files -> sorted list of existing paths (error if none, with
    ``fix``: the command that makes them, when the caller knows it)."""
    pattern = describe_files(files)
    if isinstance(files, (str, os.PathLike)):
        paths = sorted(Path(p) for p in glob.glob(pattern))
        if not paths and Path(pattern).is_file():
            paths = [Path(pattern)]
    else:
        paths = [Path(p) for p in files]
    if not paths:
        fix = fix or (
            "build the embedded corpus (python -m model.data build-corpus) or download FineWeb "
            "(python -m model.data download --variant sp8192)"
        )
        raise FileNotFoundError(f"no {what} match {pattern!r}: {fix}")
    return paths
