"""model.data: shard format, train sampler, validation stream, embedded corpus, FineWeb downloader.

Over 500 lines: one file for the package's six modules, whose tests share the shard and corpus fixtures."""

from __future__ import annotations

import ast
import json
import multiprocessing as mp
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from model import data
from model.data import ShardError, fineweb, shards

# ----------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 4097])
@pytest.mark.parametrize("kind", ["uint16", "int64", "torch"])
def test_shard_round_trip(tmp_path, n, kind):
    tokens = np.random.randint(0, 2**16, size=n).astype(np.uint16)
    src = {
        "uint16": tokens,
        "int64": tokens.astype(np.int64),
        "torch": torch.from_numpy(tokens.astype(np.int32)),
    }
    path = data.write_shard(tmp_path / "s.bin", src[kind])
    assert path.stat().st_size == 1024 + 2 * n
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, n] and not header[3:].any()
    for mmap in (True, False):
        got = data.read_shard(path, mmap=mmap)
        assert got.dtype == np.uint16 and np.array_equal(got, tokens)
    assert data.validate_shard(path) == n
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temporary file left behind


def _good_shard(tmp_path: Path, n: int = 100) -> Path:
    return data.write_shard(tmp_path / "fineweb_val_000000.bin", np.random.randint(0, 1000, size=n))


def _set_word(path: Path, index: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[4 * index : 4 * index + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


BAD_SHARDS = {
    "wrong magic": (lambda p: _set_word(p, 0, 12345), "wrong magic 12345"),
    "wrong version": (lambda p: _set_word(p, 1, 7), "unsupported version 7"),
    "truncated payload": (lambda p: p.write_bytes(p.read_bytes()[:-3]), "short read"),
    "trailing bytes": (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "trailing bytes"),
    "count too large": (lambda p: _set_word(p, 2, 101), "size mismatch"),
    "short header": (lambda p: p.write_bytes(p.read_bytes()[:500]), "shorter than the 1024-byte header"),
    "negative count": (lambda p: _set_word(p, 2, -5), "negative token count"),
    "missing": (lambda p: p.unlink(), "file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
@pytest.mark.parametrize("reader", ["read_shard", "read_shard_mmap_off", "validate_shard", "loader"])
def test_bad_shard_errors_name_file_and_fix(tmp_path, case, reader):
    path = _good_shard(tmp_path)
    damage, phrase = BAD_SHARDS[case]
    damage(path)
    call = {
        "read_shard": lambda: data.read_shard(path),
        "read_shard_mmap_off": lambda: data.read_shard(path, mmap=False),
        "validate_shard": lambda: data.validate_shard(path),
        "loader": lambda: data.ShuffledSequenceLoader([path], 8),
    }[reader]
    with pytest.raises(ShardError) as err:
        call()
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(path) in msg and phrase in msg, msg
    assert "python -m model.data" in msg  # says what to do


@pytest.mark.parametrize(
    "tokens, phrase",
    [
        (np.array([1, 2, 65536]), "token 65536 at index 2"),
        (np.array([3, -1, 5]), "token -1 at index 1"),
        (np.array([0.5, 1.0]), "must be integers"),
    ],
)
def test_write_shard_refuses_bad_tokens(tmp_path, tokens, phrase):
    path = tmp_path / "out.bin"
    with pytest.raises(ShardError, match=phrase) as err:
        data.write_shard(path, tokens)
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_write_shard_refuses_too_many_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_SHARD_TOKENS", 10)  # the real cap, 2^31 - 1, is too large to allocate
    with pytest.raises(ShardError, match="exceed") as err:
        data.write_shard(tmp_path / "big.bin", np.arange(11))
    assert "big.bin" in str(err.value)


def test_write_is_atomic_a_failed_rewrite_keeps_the_old_shard(tmp_path, monkeypatch):
    old = np.random.randint(0, 1000, size=50)
    path = data.write_shard(tmp_path / "s.bin", old)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        data.write_shard(path, np.random.randint(0, 1000, size=80))
    monkeypatch.undo()
    assert np.array_equal(data.read_shard(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]


def test_validate_shard_checks_vocab(tmp_path):
    path = data.write_shard(tmp_path / "s.bin", np.array([1, 2, 700, 3]))
    assert data.validate_shard(path, vocab_size=701) == 4
    with pytest.raises(ShardError, match="token id 700 >= vocab size 512"):
        data.validate_shard(path, vocab_size=512)


def test_validate_cli(tmp_path, capsys):
    good = data.write_shard(tmp_path / "a.bin", np.arange(10))
    bad = tmp_path / "b.bin"
    bad.write_bytes(b"junk")
    assert data.main(["validate", str(good)]) == 0
    assert data.main(["validate", str(good), str(bad)]) == 1
    out = capsys.readouterr()
    assert "10 tokens" in out.out and "b.bin" in out.err


def test_missing_shards_say_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-corpus"):
        data.ShuffledSequenceLoader(str(tmp_path / "fineweb_train_*.bin"), 16)


# ----------------------------------------------------------------------------------------------------------
# Train sampler
# ----------------------------------------------------------------------------------------------------------

FILE_STRIDE = 8192  # shard k holds tokens k*8192 + position, so every window names its file and start


def _tagged_shards(tmp_path: Path, lengths) -> list[Path]:
    paths = []
    for k, n in enumerate(lengths):
        assert n < FILE_STRIDE
        paths.append(
            data.write_shard(tmp_path / f"fineweb_train_{k:06d}.bin", k * FILE_STRIDE + np.arange(n))
        )
    return paths


def _batches(loader, count, bs):
    return [loader.next_batch(bs) for _ in range(count)]


def test_loader_batches_are_shifted_windows_of_own_shards(tmp_path):
    L = 32
    paths = _tagged_shards(tmp_path, [700, 1000, 413, 90, 2000])
    loader = data.ShuffledSequenceLoader(
        str(tmp_path / "fineweb_train_*.bin"), L, seed=3, rank=1, world_size=2
    )
    assert loader.files == paths[1::2]
    for x, y in _batches(loader, 20, 7):
        assert x.shape == y.shape == (7, L) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive
        assert torch.equal(x, x[:, :1] + torch.arange(L))  # one contiguous window each
        assert set((x[:, 0] // FILE_STRIDE).tolist()) <= {1, 3}


def test_loader_epoch_visits_every_start_once(tmp_path):
    L = 16
    lengths = [300, 517, 1000]
    _tagged_shards(tmp_path, lengths)
    loader = data.ShuffledSequenceLoader(str(tmp_path / "*.bin"), L, seed=11)
    per_epoch = sum(len(s) for s in loader.start_inds)
    x = torch.cat([b[0] for b in _batches(loader, per_epoch, 1)])
    starts = x[:, 0].numpy()
    assert len(set(starts.tolist())) == per_epoch  # without replacement
    for k, n in enumerate(lengths):
        own = starts[starts // FILE_STRIDE == k] % FILE_STRIDE
        phase = own[0] % L
        assert (own % L == phase).all() and phase <= min(L - 1, n - L - 1)
        assert len(own) == (n - 1 - phase) // L
    assert loader.epoch == 0
    loader.next_batch(1)
    assert loader.epoch == 1


def test_loader_is_deterministic_per_seed_and_rank(tmp_path):
    _tagged_shards(tmp_path, [800, 900, 1000, 1100])
    pattern = str(tmp_path / "*.bin")

    def stream(seed, rank, world=2):
        return torch.cat(
            [
                x
                for x, _ in _batches(
                    data.ShuffledSequenceLoader(pattern, 24, seed=seed, rank=rank, world_size=world), 12, 5
                )
            ]
        )

    assert torch.equal(stream(1, 0), stream(1, 0))
    assert not torch.equal(stream(1, 0), stream(2, 0))  # SEED matters (the record's loader ignores it)
    a, b = stream(1, 0), stream(1, 1)
    assert set((a[:, 0] // FILE_STRIDE).tolist()) <= {0, 2} and set((b[:, 0] // FILE_STRIDE).tolist()) <= {
        1,
        3,
    }
    rec = data.ShuffledSequenceLoader(pattern, 24, seed=5, record_seeding=True)
    rec2 = data.ShuffledSequenceLoader(pattern, 24, seed=9, record_seeding=True)
    assert torch.equal(rec.next_batch(4)[0], rec2.next_batch(4)[0])  # record: rank-only seeding


def test_loader_resumes_exactly_from_a_small_state(tmp_path):
    _tagged_shards(tmp_path, [500, 650, 333])
    pattern = str(tmp_path / "*.bin")
    a = data.ShuffledSequenceLoader(pattern, 20, seed=7)
    per_epoch = sum(len(s) for s in a.start_inds)
    _batches(a, 9, 8)  # 72 draws: into the second epoch
    assert a.epoch == 1 and per_epoch < 72
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON: fits any checkpoint
    assert len(json.dumps(state)) < 2000
    expected = _batches(a, 15, 8)  # crosses the next epoch boundary too
    b = data.ShuffledSequenceLoader(pattern, 20, seed=7)
    b.load_state_dict(state)
    got = _batches(b, 15, 8)
    assert all(torch.equal(e[0], g[0]) and torch.equal(e[1], g[1]) for e, g in zip(expected, got))
    other = data.ShuffledSequenceLoader(pattern, 20, seed=8)
    with pytest.raises(ValueError, match="seed is 7 in the checkpoint"):
        other.load_state_dict(state)


def test_loader_errors(tmp_path):
    _tagged_shards(tmp_path, [100, 100])
    pattern = str(tmp_path / "*.bin")
    with pytest.raises(ValueError, match="rank 2 of 4 gets no train shard"):
        data.ShuffledSequenceLoader(pattern, 8, rank=2, world_size=4)
    with pytest.raises(ValueError, match="no train shard holds seq_len\\+1 = 101"):
        data.ShuffledSequenceLoader(pattern, 100)
    with pytest.raises(ValueError, match="outside world_size"):
        data.ShuffledSequenceLoader(pattern, 8, rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------------------
# Validation stream (SPEC 8.1)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths, seq_len", [([1000, 537], 128), ([1000, 500], 128), ([77], 8), ([4, 5], 8)])
def test_val_stream_usable_length(tmp_path, lengths, seq_len):
    parts = [np.random.randint(0, 5000, size=n) for n in lengths]
    for i, p in enumerate(parts):
        data.write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", p)
    val = data.load_val_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len)
    total = sum(lengths)
    usable = ((total - 1) // seq_len) * seq_len
    assert val.dtype == torch.uint16 and val.numel() == usable + 1
    assert usable % seq_len == 0 and total - (usable + 1) < seq_len
    assert np.array_equal(val.numpy(), np.concatenate(parts)[: usable + 1])


def test_val_stream_too_short(tmp_path):
    data.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(8))
    with pytest.raises(ValueError, match="fewer than seq_len\\+1 = 9"):
        data.load_val_tokens(str(tmp_path / "fineweb_val_*.bin"), 8)


# ----------------------------------------------------------------------------------------------------------
# Embedded corpus (small slices of the standard library; the full build is the slow test at the end)
# ----------------------------------------------------------------------------------------------------------

SLICE = 40  # first 40 stdlib files + the pydoc topics: ~0.6 MB, ~700 documents


@pytest.fixture(scope="module")
def slice_docs():
    return data.StdlibCorpus(max_files=SLICE).documents()


def test_corpus_text_is_deterministic_and_read_without_imports(slice_docs):
    sys.modules.pop("antigravity", None)  # in the slice; importing it would open a web browser
    corpus = data.StdlibCorpus(max_files=SLICE)
    assert "antigravity.py" in [p.name for p in corpus.source_files()]
    again = corpus.documents()
    assert "antigravity" not in sys.modules
    assert again == slice_docs and data.corpus_fingerprint(again) == data.corpus_fingerprint(slice_docs)
    assert len(slice_docs) == len(set(slice_docs)) > 300 and all(d and d == d.strip() for d in slice_docs)
    from pydoc_data import topics

    assert topics.topics["if"].strip() in slice_docs
    abc_doc = ast.get_docstring(ast.parse(Path(sysconfig.get_paths()["stdlib"], "abc.py").read_text()))
    assert abc_doc in slice_docs
    assert data.corpus_fingerprint(slice_docs[:-1]) != data.corpus_fingerprint(slice_docs)
    assert slice_docs[:3] != sorted(slice_docs)[:3]  # shuffled, not alphabetical


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_corpus_build_is_deterministic_and_in_challenge_format(tmp_path, slice_docs):
    a = data.build_corpus(tmp_path / "a", slice_docs, 512)
    b = data.build_corpus(tmp_path / "b", slice_docs, 512)
    files_a, files_b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert files_a == files_b and len(files_a) == 1 + 1 + 8  # tokenizer, val, 8 train shards
    assert a.fingerprint == b.fingerprint == data.corpus_fingerprint(slice_docs)

    sp = spm.SentencePieceProcessor(model_file=str(a.tokenizer_model))
    assert a.vocab_size == sp.vocab_size() == 512
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(sp.piece_to_id("<0x0A>")) == "<0x0A>"  # byte fallback
    assert [sp.id_to_piece(i) for i in sp.encode("x 2024")][-4:] == ["2", "0", "2", "4"]  # split digits
    assert not sp.id_to_piece(sp.encode("hello")[0]).startswith("\u2581")  # add_dummy_prefix=False

    val = data.read_shard(a.val_files()[0])
    n_val = a.meta["val_documents"]
    assert n_val == int(np.ceil(0.05 * len(slice_docs)))
    assert val[0] == 1 and (val == 1).sum() == n_val and not (val == 2).any()  # [BOS] + doc, no EOS
    ends = np.flatnonzero(val == 1).tolist() + [val.size]
    assert sp.decode(val[ends[0] + 1 : ends[1]].tolist()) == sp.decode(sp.encode(slice_docs[0]))
    train = np.concatenate([data.read_shard(f) for f in a.train_files()])
    assert (train == 1).sum() == len(slice_docs) - n_val and train[0] == 1
    assert train.size + val.size == a.meta["tokens"]
    sizes = [data.validate_shard(f, vocab_size=512) for f in a.train_files()]
    assert max(sizes) - min(sizes) <= 1  # evenly split, so every rank of up to 8 gets data


def test_corpus_cache_hit_is_instant_and_reuses_documents(tmp_path, monkeypatch):
    corpus = data.StdlibCorpus(max_files=SLICE)
    first = data.ensure_corpus(384, corpus, cache_dir=tmp_path, progress=False)
    meta = first.dataset_dir.parent.parent / "meta.json"
    mtime = meta.stat().st_mtime_ns
    t0 = time.perf_counter()
    second = data.ensure_corpus(384, corpus, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t0 < 0.5
    assert second == first and meta.stat().st_mtime_ns == mtime
    assert second.meta["documents"] > 300 and second.meta["python"] == sys.version.split()[0]

    def no_reparse(self, progress=False):
        raise AssertionError("documents should come from the cache")

    monkeypatch.setattr(data.StdlibCorpus, "documents", no_reparse)
    other = data.ensure_corpus(400, corpus, cache_dir=tmp_path, progress=False)
    assert other.fingerprint == first.fingerprint and other.vocab_size == 400
    assert other.dataset_dir != first.dataset_dir


def _ensure_in_subprocess(cache_dir, queue):
    paths = data.ensure_corpus(384, data.StdlibCorpus(max_files=SLICE), cache_dir=cache_dir, progress=False)
    queue.put((str(paths.tokenizer_model), paths.fingerprint))


def test_corpus_concurrent_builders_do_not_corrupt_the_cache(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_subprocess, args=(tmp_path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = {queue.get(timeout=5) for _ in procs}
    assert len(results) == 1
    builds = [p for p in (tmp_path / "stdlib-corpus").iterdir() if p.name not in ("sources", "build.lock")]
    assert len(builds) == 1
    assert [p.name for p in builds[0].iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    paths = data.ensure_corpus(384, data.StdlibCorpus(max_files=SLICE), cache_dir=tmp_path, progress=False)
    for f in paths.train_files() + paths.val_files():
        data.validate_shard(f, vocab_size=384)


@pytest.mark.slow
def test_full_default_corpus_builds_within_budget(tmp_path):
    t0 = time.perf_counter()
    paths = data.ensure_default_corpus(8192, cache_dir=tmp_path, progress=False)
    build_s = time.perf_counter() - t0
    assert build_s < 180, f"full corpus build took {build_s:.0f} s"
    assert paths.vocab_size == 8192 and len(paths.fingerprint) == 64
    assert paths.meta["text_bytes"] > 2_000_000 and paths.meta["tokens"] > 500_000
    assert len(paths.train_files()) == 8
    t0 = time.perf_counter()
    assert data.ensure_default_corpus(8192, cache_dir=tmp_path, progress=False) == paths
    assert time.perf_counter() - t0 < 1.0


def test_a_run_imports_neither_the_downloader_nor_the_corpus_builder():
    """train.py finds its data through model/data/paths.py; the tools load only when their names are used."""
    tools = ("model.data.fineweb", "model.data.corpus", "model.data.__main__")
    code = f"import sys, train; loaded = {tools!r}; print([m for m in loaded if m in sys.modules])"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert data.StdlibCorpus.__module__ == "model.data.corpus"  # and they still load on first use


# ----------------------------------------------------------------------------------------------------------
# FineWeb downloader against a local fake hub
# ----------------------------------------------------------------------------------------------------------

ROOT = "datasets"
DS = "fineweb10B_sp8192"


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory, slice_docs):
    """A folder laid out like the hub repo: manifest, 1 val + 3 train shards, a real tiny tokenizer."""
    hub = tmp_path_factory.mktemp("hub")
    model = data.train_tokenizer(slice_docs[:300], 400)
    (hub / ROOT / "tokenizers").mkdir(parents=True)
    (hub / ROOT / "tokenizers" / "fineweb_8192_bpe.model").write_bytes(model)
    (hub / ROOT / "tokenizers" / "fineweb_8192_bpe.vocab").write_text("<unk>\t0\n")
    rng = np.random.default_rng(0)
    for name, n in [
        ("val_000000", 3000),
        ("train_000000", 5000),
        ("train_000001", 4000),
        ("train_000002", 4500),
    ]:
        data.write_shard(hub / ROOT / "datasets" / DS / f"fineweb_{name}.bin", rng.integers(0, 400, size=n))
    manifest = {
        "datasets": [
            {"name": DS, "tokenizer_name": "sp_bpe_8192", "stats": {"files_train": 3, "files_val": 1}}
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_8192",
                "model_path": "tokenizers/fineweb_8192_bpe.model",
                "vocab_path": "tokenizers/fineweb_8192_bpe.vocab",
            }
        ],
    }
    (hub / ROOT / "manifest.json").write_text(json.dumps(manifest))
    return hub


class CountingRemote(data.LocalDirRemote):
    def __init__(self, root):
        super().__init__(root)
        self.fetched: list[str] = []

    def fetch(self, path, dest):
        self.fetched.append(path)
        super().fetch(path, dest)


def test_download_full_then_resume_skips_present_files(tmp_path, fake_hub):
    remote = CountingRemote(fake_hub)
    dest = tmp_path / "data"
    paths = data.download_fineweb(dest, train_shards=2, remote=remote, progress=False)
    assert len(remote.fetched) == 1 + 1 + 2 + 2  # manifest, val, 2 train, .model + .vocab
    for rel in [
        "manifest.json",
        f"datasets/{DS}/fineweb_val_000000.bin",
        f"datasets/{DS}/fineweb_train_000001.bin",
        "tokenizers/fineweb_8192_bpe.model",
        "tokenizers/fineweb_8192_bpe.vocab",
    ]:
        assert (dest / rel).read_bytes() == (fake_hub / ROOT / rel).read_bytes(), rel
    assert not (dest / f"datasets/{DS}/fineweb_train_000002.bin").exists()
    assert paths.vocab_size == 400 and paths.source == "fineweb"
    assert [p.name for p in paths.train_files()] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert data.fineweb_paths(dest).tokenizer_model == paths.tokenizer_model

    remote.fetched.clear()
    again = data.download_fineweb(dest, train_shards=3, remote=remote, progress=False)
    assert remote.fetched == [f"{ROOT}/manifest.json", f"{ROOT}/datasets/{DS}/fineweb_train_000002.bin"]
    assert again.meta["skipped"] == 5 and again.meta["fetched"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:-10]),  # interrupted download
        lambda p: _set_word(p, 0, 0),  # same size, bad header
        lambda p: p.write_bytes(b""),
    ],
)
def test_download_refetches_a_corrupted_local_file(tmp_path, fake_hub, damage):
    remote = CountingRemote(fake_hub)
    dest = tmp_path / "data"
    data.download_fineweb(dest, train_shards=2, remote=remote, progress=False)
    bad = dest / f"datasets/{DS}/fineweb_train_000001.bin"
    damage(bad)
    remote.fetched.clear()
    logs = []
    data.download_fineweb(dest, train_shards=2, remote=remote, progress=False, log=logs.append)
    assert remote.fetched == [f"{ROOT}/manifest.json", f"{ROOT}/datasets/{DS}/fineweb_train_000001.bin"]
    assert bad.read_bytes() == (fake_hub / ROOT / f"datasets/{DS}/fineweb_train_000001.bin").read_bytes()
    assert len(logs) == 1 and str(bad) in logs[0] and "fetching it again" in logs[0]


def test_download_reports_a_corrupt_remote_file_and_writes_nothing(tmp_path, fake_hub):
    hub = tmp_path / "hub"
    import shutil

    shutil.copytree(fake_hub, hub)
    _set_word(hub / ROOT / f"datasets/{DS}/fineweb_train_000000.bin", 1, 2)  # bad version, right size
    dest = tmp_path / "data"
    with pytest.raises(data.DownloadError, match="fineweb_train_000000.bin .*unsupported version 2"):
        data.download_fineweb(dest, train_shards=1, remote=data.LocalDirRemote(hub), progress=False)
    ds = dest / "datasets" / DS
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_val_000000.bin"]  # no partial file, no temp file


def test_download_argument_errors(tmp_path, fake_hub):
    remote = data.LocalDirRemote(fake_hub)
    with pytest.raises(ValueError, match="has 3 train shards"):
        data.download_fineweb(tmp_path, train_shards=4, remote=remote, progress=False)
    with pytest.raises(data.DownloadError, match="fineweb10B_sp1024 is not in"):
        data.download_fineweb(tmp_path, variant="sp1024", remote=remote, progress=False)
    with pytest.raises(FileNotFoundError, match="model.data download --variant sp8192"):
        data.fineweb_paths(tmp_path / "nothing")


def test_download_default_repo_and_env(tmp_path, fake_hub, monkeypatch):
    seen = []

    class FakeHub(data.LocalDirRemote):
        def __init__(self, repo_id):
            seen.append(repo_id)
            super().__init__(fake_hub)

    monkeypatch.setattr(fineweb, "HubRemote", FakeHub)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    data.download_fineweb(tmp_path / "a", train_shards=0, progress=False)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    assert data.main(["download", "--dest", str(tmp_path / "b"), "--train-shards", "1"]) == 0
    assert seen == ["kevclark/parameter-golf", "someone/mirror"]
    assert (tmp_path / "b" / "datasets" / DS / "fineweb_train_000000.bin").is_file()
