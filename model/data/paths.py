"""Where a run's data is: the DataPaths record train.py reads, for a FineWeb download or for the
embedded corpus in its cache; and what a run reads there before training (RunData). Finding data
imports neither the downloader (fineweb.py) nor the corpus builder (corpus.py): they are tools run
before training, so a run neither loads nor ships them.

Embedded-corpus cache: ``<cache>/stdlib-corpus/<fingerprint[:16]>/sp<V>/`` (meta.json, tokenizers/,
datasets/), plus ``<cache>/stdlib-corpus/sources/<source key>.json`` mapping this interpreter's standard
library to its fingerprint, so a cached build is found without parsing the library again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..metrics import ByteAuditError, ByteCounter, audit_run_tables
from .loader import load_val_tokens
from .shards import TOKEN_LIMIT, resolve_shards

# Bump when the builder (corpus.py) changes the built files: it is part of the fingerprint and the cache key.
CORPUS_BUILDER_VERSION = "stdlib-corpus-v2"  # v2: the source files beside the docs
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_REPO_ROOT = Path(__file__).resolve().parents[2]
# The embedded corpus's tokenizer: byte_fallback puts the 256 byte pieces beside pad/bos/eos/unk in every
# vocabulary, so it needs at least one more piece; shards store uint16 ids, so at most TOKEN_LIMIT fit.
MIN_CORPUS_VOCAB = 256 + 4 + 1


class DataFileError(ValueError):
    """A data file (a tokenizer, a corpus cache's JSON) that cannot be read; the message names it and the
    command that makes it again."""


def download_command(variant: str, root: str | os.PathLike) -> str:
    return f"python -m model.data download --variant {variant} --dest {os.fspath(root)}"


def build_command(vocab_size: int | str | None) -> str:
    return f"python -m model.data build-corpus --vocab-size {vocab_size or '<the run vocab size>'}"


def load_tokenizer(path: str | os.PathLike, fix: str | None = None):
    """The SentencePiece model at ``path``; a DataFileError naming it (and ``fix``) when it does not load:
    sentencepiece raises a bare RuntimeError/OSError that says neither."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=os.fspath(path))
    except Exception as e:
        problem = " ".join(str(e).split())  # one line
        how = f": make it again: {fix}" if fix else ""
        raise DataFileError(f"{path} is not a SentencePiece model ({problem}){how}") from None


def _read_cache_json(path: Path, vocab_size: int | str | None) -> dict:
    """A corpus cache JSON object; a DataFileError naming the file and the rebuild when it is malformed."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problem = f"unreadable ({e})"
    else:
        if isinstance(obj, dict):
            return obj
        problem = f"holds a {type(obj).__name__}, not an object"
    raise DataFileError(
        f"corpus cache file {path} is {problem}: rebuild the corpus with {build_command(vocab_size)}"
    )


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

    @property
    def fix(self) -> str:
        """The command that (re)makes this data, for error messages."""
        if self.source == "fineweb":
            variant = self.dataset_dir.name.removeprefix("fineweb10B_")
            return download_command(variant, self.dataset_dir.parent.parent)
        return build_command(self.vocab_size)

    def train_files(self) -> list[Path]:
        return resolve_shards(self.train_pattern, "train shards", self.fix)

    def val_files(self) -> list[Path]:
        return resolve_shards(self.val_pattern, "validation shards", self.fix)

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


def fineweb_paths(root: str | os.PathLike = "data", variant: str = "sp8192") -> DataPaths:
    """Paths of an already downloaded FineWeb variant (a clear error says how to fetch it if absent or
    unreadable)."""
    root = Path(root)
    dataset_dir = root / "datasets" / f"fineweb10B_{variant}"
    vocab = variant[2:] if variant.startswith("sp") else variant
    model = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not model.is_file() or not list(dataset_dir.glob("fineweb_val_*.bin")):
        raise FileNotFoundError(
            f"FineWeb {variant} is not in {root} (need {model} and {dataset_dir}/fineweb_val_*.bin): run "
            f"{download_command(variant, root)}"
        )
    sp = load_tokenizer(model, download_command(variant, root))  # the download fetches a bad file again
    return DataPaths(dataset_dir, model, int(sp.vocab_size()), "fineweb")


def check_vocab_size(vocab_size: int, flag: str = "--vocab-size") -> None:
    """Refuse a vocabulary the corpus builder cannot make, before any work (a ValueError naming ``flag``)."""
    if not MIN_CORPUS_VOCAB <= vocab_size <= TOKEN_LIMIT:
        raise ValueError(
            f"{flag} {vocab_size}: the embedded corpus needs {MIN_CORPUS_VOCAB}..{TOKEN_LIMIT} (256 byte "
            "pieces + 4 specials at least; shards store uint16 ids), e.g. 8192 or 1024"
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("GOLFBENCH_CACHE") or Path.home() / ".cache" / "golfbench")


def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path, max_files: int | None = None) -> list[Path]:
    """The standard library's .py files under ``root``, sorted by relative path (the first ``max_files``)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files[:max_files] if max_files is not None else files


def stdlib_source_key(root: Path, max_files: int | None = None) -> str:
    """Cheap key (interpreter, paths, sizes, mtimes) that maps to a fingerprint without parsing."""
    h = hashlib.sha256(f"{CORPUS_BUILDER_VERSION}|{sys.version}|{root}|{max_files}".encode())
    from pydoc_data import topics

    h.update(f"|{topics.__file__}|{Path(topics.__file__).stat().st_size}".encode())
    for p in stdlib_source_files(root, max_files):
        st = p.stat()
        h.update(f"|{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def corpus_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "stdlib-corpus"


def built_corpus(build_dir: Path) -> DataPaths | None:
    """The corpus built in ``build_dir`` (``.../sp<V>``, from its meta.json), or None when it is absent or
    incomplete; a DataFileError when its meta.json is malformed."""
    meta_path = build_dir / "meta.json"
    if not meta_path.is_file():
        return None
    vocab = build_dir.name.removeprefix("sp")
    meta = _read_cache_json(meta_path, vocab)
    try:
        paths = DataPaths(
            build_dir / meta.pop("dataset_dir"),
            build_dir / meta.pop("tokenizer_model"),
            int(meta.pop("vocab_size")),
            "stdlib",
            meta.pop("fingerprint"),
            meta,
        )
    except (KeyError, TypeError, ValueError) as e:  # a key missing or of the wrong type
        raise DataFileError(
            f"corpus cache file {meta_path} lacks a valid {e}: rebuild the corpus with {build_command(vocab)}"
        ) from None
    if not paths.tokenizer_model.is_file() or not list(paths.dataset_dir.glob("fineweb_*.bin")):
        return None
    return paths


def source_file(source_key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return corpus_root(cache_dir) / "sources" / f"{source_key}.json"


def known_fingerprint(
    source_key: str, cache_dir: str | os.PathLike | None = None, vocab_size: int | None = None
) -> str | None:
    """The corpus fingerprint recorded for a standard library (by its source key), if any; a DataFileError
    when its file is malformed (``vocab_size``: for the rebuild command it names)."""
    path = source_file(source_key, cache_dir)
    if not path.is_file():
        return None
    fp = _read_cache_json(path, vocab_size).get("fingerprint")
    if not (isinstance(fp, str) and re.fullmatch("[0-9a-f]{64}", fp)):  # it names a cache folder
        raise DataFileError(
            f"corpus cache file {path} has no valid fingerprint: rebuild the corpus with "
            f"{build_command(vocab_size)}"
        )
    return fp


def cached_corpus(
    vocab_size: int, source_key: str, cache_dir: str | os.PathLike | None = None
) -> DataPaths | None:
    """The embedded corpus of the standard library with this source key at ``vocab_size``, if built."""
    fp = known_fingerprint(source_key, cache_dir, vocab_size)
    return built_corpus(corpus_root(cache_dir) / fp[:16] / f"sp{vocab_size}") if fp else None


def default_corpus(vocab_size: int, progress: bool = True) -> DataPaths:
    """The embedded default corpus (whole standard library) at ``vocab_size``, from the cache, built
    first when missing by its own command (the builder holds a file lock: concurrent ranks build once)."""
    check_vocab_size(vocab_size, "the model's vocab_size (--model-vocab-size)")  # before the build command
    key = stdlib_source_key(default_stdlib_dir())
    paths = cached_corpus(vocab_size, key)
    if paths is not None:
        return paths
    cmd = [sys.executable, "-m", "model.data", "build-corpus", "--vocab-size", str(vocab_size)]
    proc = subprocess.run(
        cmd,
        cwd=_REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=None if progress else subprocess.PIPE,
        text=True,
    )
    paths = cached_corpus(vocab_size, key) if proc.returncode == 0 else None
    if paths is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr or 'see above'}")
    return paths


@dataclass
class RunData:
    """What a run reads before training: where the data is, the validation stream (trimmed to the config's
    val_max_tokens) and its tokenizer's byte counter (bits per byte)."""

    paths: DataPaths
    val_tokens: torch.Tensor
    byte_counter: ByteCounter
    val_sha256: str | None = None  # train.py's start-up checks record it (read_run_data does not hash)


def read_run_data(cfg, paths: DataPaths, vocab_size: int, fix: str | None = None) -> RunData:
    """What a run reads of ``paths`` before training: the validation stream (trimmed to the config's
    val_max_tokens) and the byte counter of its tokenizer (``cfg``: a model.run_config.Config; ``fix``:
    the command that makes the tokenizer again, for its error)."""
    val = load_val_tokens(paths.val_pattern, cfg.eval_seq_len, vocab_size)
    if cfg.val_max_tokens > 0 and val.numel() - 1 > cfg.val_max_tokens:
        usable = (cfg.val_max_tokens // cfg.eval_seq_len) * cfg.eval_seq_len
        val = val[: usable + 1].clone()
    sp = load_tokenizer(paths.tokenizer_model, fix)
    return RunData(paths, val, ByteCounter(sp, vocab_size=vocab_size))


def load_run_data(cfg, data_dir: str | None, vocab_size: int, progress: bool, log) -> RunData:
    """FineWeb under ``data_dir``, else the embedded corpus (``cfg``: a model.run_config.Config). Refuses a
    tokenizer whose piece count is not the model's vocab_size and validation ids >= vocab_size, and audits
    the byte tables (model.metrics.audit_run_tables): a run never reports a bpb from mismatched tables."""
    # Every rank asks: the corpus builder holds a file lock, so a missing corpus is built once.
    paths = fineweb_paths(data_dir, f"sp{vocab_size}") if data_dir else default_corpus(vocab_size, progress)
    if paths.vocab_size > vocab_size:
        raise SystemExit(
            f"the tokenizer {paths.tokenizer_model} has {paths.vocab_size} pieces but the model's vocab_size "
            f"is {vocab_size}: use matching data (--data) or --model-vocab-size {paths.vocab_size}"
        )
    if paths.vocab_size < vocab_size:
        raise SystemExit(
            f"the tokenizer {paths.tokenizer_model} has {paths.vocab_size} pieces but the model's vocab_size "
            f"is {vocab_size}: ids {paths.vocab_size}..{vocab_size - 1}, which the model can emit, would "
            "count 0 bytes and make bits per byte wrong; use the tokenizer the shards were made with, or "
            f"--model-vocab-size {paths.vocab_size}"
        )
    data = read_run_data(cfg, paths, vocab_size, paths.fix)
    val, counter = data.val_tokens, data.byte_counter
    sp = load_tokenizer(paths.tokenizer_model, paths.fix)  # the audit decodes with it (ms: loaded twice)
    t0 = time.perf_counter()
    try:
        audit = audit_run_tables(sp, counter.luts, val)
    except ByteAuditError as exc:
        raise SystemExit(
            f"the byte tables of {paths.tokenizer_model} disagree with its decoder, so bits per byte would "
            f"be wrong: {exc}"
        ) from None
    audited = (
        f"{audit.targets:,} val tokens ({audit.segments:,} documents) and every table entry"
        if audit
        else "not possible (no BOS in the validation stream)"
    )
    sha = data.val_sha256 = hashlib.sha256(val.numpy().tobytes()).hexdigest()
    log(
        f"data: {paths.source} {paths.dataset_dir} | val tokens {val.numel() - 1:,} (ids < {vocab_size}) | "
        f"val sha256 {sha[:16]} | byte tables audited against the decoder: {audited} in "
        f"{time.perf_counter() - t0:.2f} s"
    )
    return data
