"""python -m model.data: build the embedded corpus, download FineWeb, validate shards.

python -m model.data build-corpus --vocab-size 8192        # embedded corpus, no network (~15 s)
python -m model.data download --variant sp8192 --train-shards 80 --dest data   # needs the HF hub
python -m model.data validate data/datasets/fineweb10B_sp8192/*.bin
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .corpus import StdlibCorpus, ensure_corpus
from .fineweb import DEFAULT_REMOTE_ROOT, DEFAULT_REPO_IDS, DownloadError, LocalDirRemote, download_fineweb
from .shards import ShardError, validate_shard


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
    # A bad argument or file: one line naming it and what to do (exit 1), no traceback. The library
    # functions check their arguments before any work or any write.
    try:
        return run(args)
    except (ValueError, DownloadError) as e:  # ShardError and DataFileError are ValueErrors
        raise SystemExit(f"python -m model.data {args.cmd}: {e}") from None


def run(args: argparse.Namespace) -> int:
    if args.cmd == "download":
        if args.from_dir and not Path(args.from_dir).is_dir():
            raise ValueError(f"--from-dir {args.from_dir}: no such folder; pass a copy of the hub repo")
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
        if args.vocab_size is not None and args.vocab_size < 2:  # its advice would name "sp-5"
            raise ValueError(f"--vocab-size {args.vocab_size}: must be >= 2 (the tokenizer's piece count)")
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
