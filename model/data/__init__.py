"""Tokens on disk (SPEC.md section 2, 8.1), one module per job:

    shards.py    the challenge's shard format: write, read, validate, find
    loader.py    the train sampler, the validation stream, one rank's micro-batches
    paths.py     where a run's data is (FineWeb download or the cached embedded corpus), what it reads
    fineweb.py   the FineWeb downloader                       (a tool: python -m model.data download)
    corpus.py    the embedded corpus from the standard library (a tool: python -m model.data build-corpus)
    __main__.py  python -m model.data: build-corpus | download | validate

Every public name is importable from ``model.data``. The downloader's and the corpus builder's names load
their module on first use: a training run never imports those tools, so their code is not shipped.
"""

from __future__ import annotations

import importlib

from ..atomic import atomic_write  # its home was model/data.py before model/atomic.py: the old name stays
from .loader import RankBatches, ShuffledSequenceLoader, load_val_tokens
from .paths import (
    CORPUS_BUILDER_VERSION,
    DataFileError,
    DataPaths,
    RunData,
    default_cache_dir,
    default_corpus,
    fineweb_paths,
    load_run_data,
    load_tokenizer,
    read_run_data,
)
from .shards import (
    HEADER_BYTES,
    HEADER_INTS,
    MAX_SHARD_TOKENS,
    SHARD_MAGIC,
    SHARD_VERSION,
    TOKEN_LIMIT,
    ShardError,
    check_token_ids,
    read_shard,
    read_shard_header,
    resolve_shards,
    validate_shard,
    write_shard,
)

_TOOLS = {
    "fineweb": (
        "CHALLENGE_REPO_ID",
        "DEFAULT_REMOTE_ROOT",
        "DEFAULT_REPO_IDS",
        "DownloadError",
        "HubRemote",
        "LocalDirRemote",
        "Remote",
        "download_fineweb",
    ),
    "corpus": (
        "CORPUS_TRAIN_SHARDS",
        "SENTENCEPIECE_SETTINGS",
        "TRAINER_MAX_SENTENCES",
        "VAL_FRACTION",
        "StdlibCorpus",
        "build_corpus",
        "corpus_fingerprint",
        "ensure_corpus",
        "ensure_default_corpus",
        "train_tokenizer",
    ),
    "__main__": ("main",),
}
_TOOL_OF = {name: module for module, names in _TOOLS.items() for name in names}


def __getattr__(name: str):
    module = _TOOL_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "CORPUS_BUILDER_VERSION",
    "atomic_write",
    "DataFileError",
    "DataPaths",
    "HEADER_BYTES",
    "HEADER_INTS",
    "MAX_SHARD_TOKENS",
    "RankBatches",
    "RunData",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "TOKEN_LIMIT",
    "ShardError",
    "check_token_ids",
    "ShuffledSequenceLoader",
    "default_cache_dir",
    "default_corpus",
    "fineweb_paths",
    "load_run_data",
    "load_tokenizer",
    "load_val_tokens",
    "read_run_data",
    "read_shard",
    "read_shard_header",
    "resolve_shards",
    "validate_shard",
    "write_shard",
    *_TOOL_OF,
]
