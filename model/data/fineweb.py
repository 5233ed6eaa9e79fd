"""The FineWeb downloader: the challenge's manifest-driven layout (SPEC.md 2.2), from the Hugging Face
hub or a local mirror. A tool run before training (``python -m model.data download``); train.py finds
its output through ``model.data.fineweb_paths``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from ..atomic import atomic_path, atomic_write
from .paths import DataFileError, DataPaths, load_tokenizer
from .shards import ShardError, read_shard_header

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
        try:
            load_tokenizer(path)
        except DataFileError as e:
            return str(e).removeprefix(f"{path} is ")
    elif kind == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            return f"invalid JSON ({e})"
    return None


def _fetch_verified(remote: Remote, rpath: str, dest: Path, expected_size: int | None) -> None:
    with atomic_path(dest) as tmp:
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
    # Arguments first, and nothing is written to dest (not even the folder) until the manifest has the
    # variant and the shards asked for.
    if train_shards < 0:
        raise ValueError(f"--train-shards {train_shards}: must be >= 0")
    if not re.fullmatch(r"sp[1-9][0-9]*", variant):  # train.py --data reads fineweb10B_sp<vocab size>
        raise ValueError(f"--variant {variant!r}: must be sp<vocab size>, e.g. sp8192 or sp1024")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--dest {dest}: is a file, not a folder; pass a folder")
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
    with tempfile.TemporaryDirectory() as tmp:
        _fetch_verified(remote, prefix + "manifest.json", Path(tmp) / "manifest.json", None)
        manifest_bytes = (Path(tmp) / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    dataset_dir = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"{dataset_dir} is not in {remote!r} {prefix}manifest.json (it lists {names})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise ValueError(
            f"--train-shards {train_shards}: {variant} has {n_train} train shards on {remote!r}; pass "
            f"at most {n_train}"
        )
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

    with atomic_write(dest / "manifest.json") as f:
        f.write(manifest_bytes)
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

    vocab = int(load_tokenizer(dest / model_file).vocab_size())
    meta = {
        "remote": repr(remote),
        "train_shards": train_shards,
        "val_shards": n_val,
        "fetched": fetched,
        "skipped": skipped,
    }
    return DataPaths(dest / "datasets" / dataset_dir, dest / model_file, vocab, "fineweb", None, meta)
