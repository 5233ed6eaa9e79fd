"""The embedded default corpus: English that ships with every Python, in the challenge's format.

Documents are the pydoc topics, the standard library's docstrings and its source files; a
SentencePiece BPE is trained on them with the record tokenizer's settings and the tokens are written as
challenge shards (SPEC.md 2.2).
A tool run before training (``python -m model.data build-corpus``); train.py finds its output through
model/data/paths.py and runs this command itself when the cache lacks it.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, umask
from .paths import (
    CORPUS_BUILDER_VERSION,
    DataFileError,
    DataPaths,
    built_corpus,
    cached_corpus,
    check_vocab_size,
    corpus_root,
    default_stdlib_dir,
    known_fingerprint,
    load_tokenizer,
    source_file,
    stdlib_source_files,
    stdlib_source_key,
)
from .shards import write_shard

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


class StdlibCorpus:
    """Documents = the pydoc topics (``pydoc_data.topics``, sorted by name), every module, class and
    function docstring of the standard library's .py files (sorted by path, in source order), read with
    ``ast`` without importing anything, then the text of each of those files. Exact duplicates are
    dropped; the documents are then put in a fixed pseudo-random order (sorted by sha256 of index and
    text), like FineWeb's pre-shuffled docs.

    ``max_files`` keeps only the first N source files (tests use small slices).
    """

    def __init__(self, stdlib_dir: str | os.PathLike | None = None, max_files: int | None = None):
        self.stdlib_dir = Path(stdlib_dir) if stdlib_dir else default_stdlib_dir()
        self.max_files = max_files

    def source_files(self) -> list[Path]:
        return stdlib_source_files(self.stdlib_dir, self.max_files)

    def source_key(self) -> str:
        return stdlib_source_key(self.stdlib_dir, self.max_files)

    def documents(self, progress: bool = False) -> list[str]:
        from pydoc_data import topics

        from tqdm.auto import tqdm

        docs = [topics.topics[k] for k in sorted(topics.topics)]
        for path in tqdm(self.source_files(), desc="stdlib docstrings", unit="file", disable=not progress):
            docs += _docstrings(path)
        # The source files themselves, each one document: ~31 MB beside ~2.7 MB of docs, so that one
        # record-config step (786,432 tokens) is a small part of the corpus, not all of it.
        docs += [_source_text(path) for path in self.source_files()]
        seen: set[str] = set()
        unique = []
        for d in docs:
            d = d.replace("\x00", " ").strip()
            if d and d not in seen:
                seen.add(d)
                unique.append(d)
        keys = [hashlib.sha256(f"{i}\x00{d}".encode()).digest() for i, d in enumerate(unique)]
        return [d for _, d in sorted(zip(keys, unique))]


def _source_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


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

    check_vocab_size(vocab_size)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(documents)),
            model_writer=buf,
            vocab_size=vocab_size,
            **SENTENCEPIECE_SETTINGS,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 300 vs 343."
        problem = str(e).split("] ", 1)[-1].strip()  # without sentencepiece's source location
        raise ValueError(f"--vocab-size {vocab_size}: the tokenizer trainer refused it: {problem}") from None
    # hard_vocab_limit=False lets the trainer stop short when the text has too few merges: a tokenizer
    # smaller than asked would be filed under sp<vocab_size> and mislead every run that uses it.
    pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).vocab_size()
    if pieces < vocab_size:
        raise ValueError(
            f"--vocab-size {vocab_size}: the corpus yields only {pieces:,} pieces; use --vocab-size {pieces} "
            "or less"
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


def _load_documents(path: Path, fingerprint: str) -> list[str] | None:
    try:
        documents = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError):
        return None
    return documents if corpus_fingerprint(documents) == fingerprint else None


def _unless_damaged(find, *args):
    """``find(*args)`` (a cache lookup of paths.py), or None when the cache entry it reads is damaged: a
    malformed JSON file or a tokenizer that does not load. This is the builder, so it builds over it (a run
    is refused with the file named instead)."""
    try:
        found = find(*args)
        if isinstance(found, DataPaths):
            load_tokenizer(found.tokenizer_model)
        return found
    except DataFileError:
        return None


def ensure_corpus(
    vocab_size: int,
    corpus: StdlibCorpus | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DataPaths:
    """Build the embedded corpus for ``vocab_size`` once and return its paths (instant when cached).

    Cache layout: see model/data/paths.py. Builds go to a temporary directory renamed into place, under a
    file lock, so concurrent processes (torchrun ranks) build once and never see half-written files.
    """
    check_vocab_size(vocab_size)  # before the lock file (and its folders) or any parsing
    corpus = corpus or StdlibCorpus()
    root = corpus_root(cache_dir)
    key = corpus.source_key()
    if (paths := _unless_damaged(cached_corpus, vocab_size, key, cache_dir)) is not None:
        return paths
    with _file_lock(root / "build.lock"):
        # built while we waited?
        if (paths := _unless_damaged(cached_corpus, vocab_size, key, cache_dir)) is not None:
            return paths
        documents = None
        fp = _unless_damaged(known_fingerprint, key, cache_dir)
        if fp:  # known stdlib, new vocab size: reuse its extracted documents
            documents = _load_documents(root / fp[:16] / "documents.json.gz", fp)
        if documents is None:
            documents = corpus.documents(progress=progress)
            fp = corpus_fingerprint(documents)
            with atomic_write(root / fp[:16] / "documents.json.gz") as f:
                f.write(gzip.compress(json.dumps(documents).encode("utf-8"), mtime=0))
        final = root / fp[:16] / f"sp{vocab_size}"
        paths = _unless_damaged(built_corpus, final)
        if paths is None:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".sp{vocab_size}.", dir=final.parent))
            os.chmod(tmp, 0o777 & ~umask())
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
            paths = built_corpus(final)
            assert paths is not None, f"corpus build in {final} left no usable meta.json"
        with atomic_write(source_file(key, cache_dir), "w") as f:
            json.dump({"fingerprint": fp, "stdlib": str(corpus.stdlib_dir), "python": sys.version}, f)
        return paths


def ensure_default_corpus(
    vocab_size: int = 8192, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> DataPaths:
    """The embedded default corpus (whole standard library) for ``vocab_size``; see ``ensure_corpus``."""
    return ensure_corpus(vocab_size, StdlibCorpus(), cache_dir=cache_dir, progress=progress)
