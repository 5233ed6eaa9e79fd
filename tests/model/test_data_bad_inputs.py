"""model.data on bad input: one line naming the file or the argument and what to do (no traceback), given
before any work and leaving nothing behind. The shard, corpus and fake-hub fixtures are test_data.py's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import data
from tests.model import test_data

SLICE = test_data.SLICE
slice_docs, fake_hub = test_data.slice_docs, test_data.fake_hub  # its fixtures, shared

ROOT = Path(__file__).resolve().parents[2]


def _refused(*args, needles: tuple[str, ...] = ()) -> str:
    """``python -m model.data ARGS`` (in this process: a subprocess costs seconds of imports) is refused with
    a SystemExit of one line holding every needle, which Python prints with exit status 1."""
    with pytest.raises(SystemExit) as exc:
        data.main([str(a) for a in args])
    msg = exc.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "model.data",
        "build-corpus",
        "--vocab-size",
        "-1",
        "--cache-dir",
        tmp_path / "c",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and "--vocab-size -1" in proc.stderr, proc.stderr
    assert not (tmp_path / "c").exists()


def _fineweb_dir(root: Path, hub: Path, variant: str = "sp1024") -> Path:
    """A --data folder of ``variant``: the fake hub's tokenizer, one validation shard, no train shards."""
    vocab = variant[2:]
    (root / "tokenizers").mkdir(parents=True)
    model = (hub / "datasets" / "tokenizers" / "fineweb_8192_bpe.model").read_bytes()
    (root / "tokenizers" / f"fineweb_{vocab}_bpe.model").write_bytes(model)
    data.write_shard(
        root / "datasets" / f"fineweb10B_{variant}" / "fineweb_val_000000.bin", np.arange(3000) % 400
    )
    return root


# 1. A --data folder whose tokenizer file is empty or garbage
@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_bad_tokenizer_in_data_dir_names_the_file_and_the_download(tmp_path, fake_hub, content):
    root = _fineweb_dir(tmp_path / "data", fake_hub)
    model = root / "tokenizers" / "fineweb_1024_bpe.model"
    model.write_bytes(content)
    with pytest.raises(data.DataFileError) as err:
        data.fineweb_paths(root, "sp1024")
    msg = str(err.value)
    assert str(model) in msg and "not a SentencePiece model" in msg and "\n" not in msg
    assert f"python -m model.data download --variant sp1024 --dest {root}" in msg


# 2. A cached corpus with a malformed meta.json, sources/*.json or tokenizer
@pytest.mark.parametrize("damaged", ["meta", "source", "source-fingerprint", "tokenizer"])
def test_damaged_corpus_cache_names_the_file_and_build_corpus_rebuilds_it(tmp_path, damaged):
    corpus = data.StdlibCorpus(max_files=SLICE)
    good = data.ensure_corpus(384, corpus, cache_dir=tmp_path, progress=False)
    key = corpus.source_key()
    source = tmp_path / "stdlib-corpus" / "sources" / f"{key}.json"
    files = {
        "meta": (good.dataset_dir.parent.parent / "meta.json", '{"a": "\x01"}'),
        "source": (source, "{not json"),
        "source-fingerprint": (source, '{"fingerprint": "../../x"}'),
        "tokenizer": (good.tokenizer_model, "junk"),
    }
    path, text = files[damaged]
    path.write_text(text)
    if damaged == "tokenizer":  # the cache looks whole; the run loads the tokenizer (load_run_data)
        with pytest.raises(data.DataFileError) as err:
            data.load_tokenizer(good.tokenizer_model, good.fix)
    else:
        with pytest.raises(data.DataFileError) as err:
            data.paths.cached_corpus(384, key, tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "python -m model.data build-corpus --vocab-size 384" in msg
    assert "\n" not in msg
    # what the message says to run works: the builder builds over the damaged entry
    rebuilt = data.ensure_corpus(384, corpus, cache_dir=tmp_path, progress=False)
    assert rebuilt == good and data.paths.cached_corpus(384, key, tmp_path) == good
    assert data.load_tokenizer(rebuilt.tokenizer_model).vocab_size() == 384


# 3, 4. build-corpus --vocab-size out of range: refused at once, nothing written
@pytest.mark.parametrize("vocab", [-1, 0, 100, 65537, 100000])
def test_build_corpus_refuses_a_vocab_size_out_of_range_before_any_work(tmp_path, vocab, monkeypatch):
    def no_parse(self, progress=False):
        raise AssertionError("the refusal comes before any work")

    monkeypatch.setattr(data.StdlibCorpus, "documents", no_parse)
    cache = tmp_path / "cache"
    _refused(
        "build-corpus",
        "--vocab-size",
        vocab,
        "--cache-dir",
        cache,
        needles=(f"--vocab-size {vocab}", "261..65536"),
    )
    assert not cache.exists()


class _TinyCorpus(data.StdlibCorpus):
    """A corpus of a few short documents: too little text for a large vocabulary."""

    def __init__(self, documents):
        super().__init__(max_files=1)
        self._documents = documents

    def documents(self, progress=False):
        return self._documents


# 4. a tokenizer that comes out smaller than asked is refused, not filed under sp<asked>
def test_a_tokenizer_with_fewer_pieces_than_asked_is_refused(tmp_path, slice_docs):
    with pytest.raises(ValueError, match=r"--vocab-size 3000: the corpus yields only [\d,]+ pieces"):
        data.train_tokenizer(slice_docs[:20], 3000)
    with pytest.raises(ValueError, match="--vocab-size 3000"):
        data.ensure_corpus(3000, _TinyCorpus(slice_docs[:20]), cache_dir=tmp_path, progress=False)
    root = tmp_path / "stdlib-corpus"
    assert not list(root.glob("*/sp3000")) and not list(root.glob("*/.sp3000.*"))
    assert not (root / "sources").exists()


# 5. download: bad arguments get one line and no --dest folder
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--train-shards", "-3"], ["--train-shards -3", ">= 0"]),
        (["--from-dir", "/nonexist"], ["--from-dir /nonexist", "no such folder"]),
        (["--variant", "foo"], ["--variant 'foo'", "sp<vocab size>"]),
    ],
)
def test_download_bad_arguments_are_refused_without_a_dest_folder(tmp_path, args, needles):
    dest = tmp_path / "dest"
    _refused("download", "--dest", dest, *args, needles=needles)
    assert not dest.exists()


def test_download_of_a_variant_not_in_the_manifest_leaves_no_dest_folder(tmp_path, fake_hub):
    dest = tmp_path / "dest"
    hub = ("--dest", dest, "--from-dir", fake_hub)
    _refused(
        "download", "--variant", "sp1024", *hub, needles=("fineweb10B_sp1024 is not in", "manifest.json")
    )
    _refused("download", "--train-shards", "9", *hub, needles=("has 3 train shards",))
    assert not dest.exists()
    file = tmp_path / "a-file"
    file.write_text("x")
    _refused("download", "--dest", file, "--from-dir", fake_hub, needles=(f"--dest {file}", "not a folder"))


# 6. validate --vocab-size below 2
@pytest.mark.parametrize("vocab", ["0", "-5"])
def test_validate_refuses_a_vocab_size_below_2(tmp_path, vocab):
    shard = data.write_shard(tmp_path / "s.bin", np.arange(10))
    err = _refused("validate", shard, "--vocab-size", vocab, needles=(f"--vocab-size {vocab}", ">= 2"))
    assert "sp-" not in err and "sp0" not in err


# 7. plain paths in the data-rank error; the missing-shards hint names the data's own variant
def test_loader_rank_error_prints_plain_paths(tmp_path):
    files = [data.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(100)) for i in range(2)]
    with pytest.raises(ValueError, match="rank 2 of 4 gets no train shard") as err:
        data.ShuffledSequenceLoader(files, 8, rank=2, world_size=4)
    assert "PosixPath" not in str(err.value) and str(files[0]) in str(err.value)


def test_missing_train_shards_hint_names_the_datas_variant(tmp_path, fake_hub):
    root = _fineweb_dir(tmp_path / "data", fake_hub, "sp1024")
    paths = data.fineweb_paths(root, "sp1024")
    with pytest.raises(FileNotFoundError) as err:
        paths.train_files()
    assert f"download --variant sp1024 --dest {root}" in str(err.value) and "sp8192" not in str(err.value)
    corpus = data.DataPaths(tmp_path / "none", tmp_path / "t.model", 1024, "stdlib")
    with pytest.raises(FileNotFoundError, match="build-corpus --vocab-size 1024"):
        corpus.train_files()
