"""Wheels for an offline GPU machine: `pack` them here, `install` them there (bench/wheels.sh runs this).

The GPU machine has no network, and one call to it carries at most 64 MiB, the repository's working tree
(~9 MB) included. The optional extras (pyproject.toml: `fa4`, `liger`) and brotli (model/quant.py writes
artifacts with it; the GPU image lacks it) travel as wheels, except one: nvidia-cutlass-dsl-libs-cu13,
the CuTe DSL compiler FlashAttention-4 needs, is a 92 MB wheel (237 MB unpacked, 193 MB of it one
shared library). `pack` re-compresses its files with xz -9e (~61 MB) into self-contained tar.xz parts of
at most PART_MB each, the first as large as allowed so that the second call, which also carries every
other wheel, stays small. Files above PIECE_MB are cut into pieces (PATH.piece-I-of-N), so that a part
can end anywhere; `install` joins them once every part has been unpacked, then checks every file of the
wheel against its RECORD (size and sha256): the tree is the one pip would install from the wheel.

Layout of DIR (default .whl/fa4, git-ignored):
  DIR/wheels/*.whl               every other wheel, pip-installed on the GPU machine
  DIR/fa4-libs/partN.tar.xz      the libs wheel's files, in parts
  DIR/cache/                     the downloaded libs wheel (never carried)

  bash bench/wheels.sh pack [DIR]             here: download, split, print the sizes and the carry lists
  bash bench/wheels.sh install [DIR] [--check]
      there, from the repository root: unpack the parts present into STAGE (default /tmp/site.parts;
      parts already unpacked are skipped), and once all are there pip-install DIR/wheels into SITE
      (default /tmp/site) and merge the libs into it. Prints one line on stdout, the PYTHONPATH to
      export (pip's .pth files are not read from a --target folder, so the CuTe DSL's own folder is
      named too): eval "$(bash bench/wheels.sh install)". --check imports every installed package.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# The GPU machine: CPython 3.12 on x86-64 Linux, CUDA 13 (torch 2.11+cu130). One pin per package; they
# are the extras' pins in pyproject.toml (tests/bench/test_wheels.py checks that they agree).
# (pip does not read manylinux_2_28 as also taking the older manylinux2014 wheels: both are named.)
PYTHON_VERSION, PLATFORMS = "3.12", ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
LIBS = "nvidia-cutlass-dsl-libs-cu13==4.8.1"
FA4 = (
    "flash-attn-4==4.0.0b36",
    "nvidia-cutlass-dsl==4.8.1",
    "nvidia-cutlass-dsl-libs-base==4.8.1",
    "nvidia-cutlass-dsl-libs-core==4.8.1",
    "quack-kernels==0.6.5",
    "apache-tvm-ffi==0.1.15.post2",
    "torch-c-dlpack-ext==0.1.5",
)
LIGER = ("liger-kernel==0.8.5",)
# The base dependencies the GPU image lacks: brotli (artifacts) and python-minifier (train.py builds the
# shipped program to count its code bytes, model/run/shipped_code.py).
BROTLI = ("brotli==1.2.1", "python-minifier==3.4.0")
# What --check imports (the GPU image has the rest: torch, triton, cuda-bindings, einops, protobuf).
IMPORTS = ("brotli", "python_minifier", "liger_kernel", "cutlass", "flash_attn.cute")

PART_MB = 45.0  # one call: ~9 MB of working tree + a part (+ the other wheels in the second) < 64 MiB
PIECE_MB = 4.0  # the smaller, the closer a part ends to PART_MB
CALL_MB = 55.0  # what one call may carry besides the working tree
XZ_PRESET = 9 | lzma.PRESET_EXTREME
# An LZMA2 encoder writes a chunk once it holds 64 KiB of compressed output (or 2 MiB of input): what a
# part holds is what it has written so far plus at most this much.
LAG = 64 * 1024
MANIFEST_DIR = ".golfbench-parts"  # inside each part; kept in STAGE, never merged into SITE
MB = 1e6


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# pack (here)
# --------------------------------------------------------------------------------------------------


def download(specs, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--python-version", PYTHON_VERSION, *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), *specs,
    ]  # fmt: skip
    _say(f"wheels: {' '.join(cmd[3:])}")
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"wheels pack: pip download into {dest} failed (see above)")


def _members(wheel: Path, piece_bytes: int):
    """(name, data, mode, mtime) of every file of the wheel in its order, files above piece_bytes cut
    into pieces NAME.piece-I-of-N (I from 1)."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            data = zf.read(info)
            mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644  # what pip gives the file
            mtime = int(datetime.datetime(*info.date_time).timestamp())
            n = max(1, -(-len(data) // piece_bytes))
            if n == 1:
                yield info.filename, data, mode, mtime
                continue
            for i in range(n):
                chunk = data[i * piece_bytes : (i + 1) * piece_bytes]
                yield f"{info.filename}.piece-{i + 1}-of-{n}", chunk, mode, mtime


class _Part:
    """One tar.xz being written, and how many compressed bytes it holds so far."""

    def __init__(self, path: Path, preset: int):
        self.path, self.raw, self.names = path, 0, []
        # closed in close(), after the manifest is added
        self.file = open(path, "wb")  # noqa: SIM115
        self.xz = lzma.LZMAFile(self.file, "w", preset=preset)  # noqa: SIM115
        self.tar = tarfile.open(fileobj=self.xz, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add(self, name: str, data: bytes, mode: int, mtime: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, mtime
        self.tar.addfile(info, io.BytesIO(data))
        self.raw += len(data)
        self.names.append(name)

    def compressed(self) -> int:
        return self.file.tell()

    def close(self, manifest: dict) -> None:
        data = json.dumps({**manifest, "files": self.names}, indent=1).encode()
        self.add(f"{MANIFEST_DIR}/part{manifest['part']}.json", data, 0o644, 0)
        self.tar.close()
        self.xz.close()
        self.file.close()


def split_wheel(
    wheel: Path, out_dir: Path, part_mb: float = PART_MB, piece_mb: float = PIECE_MB, preset: int = XZ_PRESET
) -> list[Path]:
    """The files of `wheel` as self-contained tar.xz parts out_dir/part1.tar.xz ... of <= part_mb MB each.

    A part is closed when the next member could push it over the limit: what it has written, plus what
    the encoder holds (LAG), plus the next member at 1.25x the part's compression ratio so far. A part
    that still ends above the limit is an error (lower piece_mb).
    Each part holds MANIFEST_DIR/partI.json: the wheel's name, I, and whether it is the last part."""
    if not 0 < piece_mb < part_mb:
        raise ValueError(f"need 0 < piece_mb < part_mb, got {piece_mb} and {part_mb}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part*.tar.xz"):
        old.unlink()
    limit = int(part_mb * MB)
    parts, part = [], None
    for name, data, mode, mtime in _members(wheel, int(piece_mb * MB)):
        if part is not None and part.raw:
            held = part.compressed() + LAG
            if held + min(1.0, 1.25 * held / part.raw) * len(data) + 1024 > limit:
                part.close({"wheel": wheel.name, "part": len(parts), "last": False})
                part = None
        if part is None:
            parts.append(out_dir / f"part{len(parts) + 1}.tar.xz")
            part = _Part(parts[-1], preset)
        part.add(name, data, mode, mtime)
    if part is None:
        raise ValueError(f"{wheel}: the wheel holds no files")
    part.close({"wheel": wheel.name, "part": len(parts), "last": True})
    for path in parts:
        if path.stat().st_size > limit:
            raise ValueError(
                f"{path}: {path.stat().st_size / MB:.1f} MB is above {part_mb} MB: lower piece_mb"
            )
    return parts


def _mb(paths) -> float:
    return sum(p.stat().st_size for p in paths) / MB


def pack(root: Path, part_mb: float, piece_mb: float) -> int:
    wheels, cache, libs = root / "wheels", root / "cache", root / "fa4-libs"
    download((*FA4, *LIGER, *BROTLI), wheels)
    download((LIBS,), cache)
    name = LIBS.split("==")[0].replace("-", "_")
    big = sorted(cache.glob(f"{name}-{LIBS.split('==')[1]}-*.whl"))
    if len(big) != 1:
        raise SystemExit(f"wheels pack: expected one {LIBS} wheel in {cache}, found {[p.name for p in big]}")
    parts = split_wheel(big[0], libs, part_mb, piece_mb)
    small = sorted(wheels.glob("*.whl"))
    print(f"{big[0].name}: {big[0].stat().st_size / MB:.1f} MB as a wheel, {len(parts)} xz parts:")
    for p in parts:
        print(f"  {p}  {p.stat().st_size / MB:.1f} MB")
    print(f"{wheels}/: {len(small)} wheels, {_mb(small):.1f} MB")
    for w in small:
        print(f"  {w.name}  {w.stat().st_size / MB:.2f} MB")
    calls = [[p] for p in parts[:-1]] + [[parts[-1], wheels]]
    print("carry, one call each, on one warm machine (paths from the repository root):")
    worst = 0.0
    for i, carry in enumerate(calls, 1):
        size = sum(_mb(c.glob("*.whl")) if c.is_dir() else _mb([c]) for c in carry)
        worst = max(worst, size)
        print(f"  call {i}: {json.dumps([str(c) for c in carry])}  {size:.1f} MB")
    print(f'  each call runs first: eval "$(bash bench/wheels.sh install {root})"')
    if worst > CALL_MB:
        _say(f"wheels pack: a call would carry {worst:.1f} MB, above {CALL_MB} MB")
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# install (there)
# --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_parts(libs: Path, stage: Path) -> dict:
    """Unpack every part present in `libs` into `stage` (each once: a stamp holds its sha256), then join
    the files whose every piece is there. Returns {"wheel", "unpacked": [part numbers], "parts": the
    number of parts once the last one is unpacked (else None), "waiting": pieces without their file,
    "complete"}."""
    stamps = stage / MANIFEST_DIR
    stamps.mkdir(parents=True, exist_ok=True)
    for part in sorted(libs.glob("part*.tar.xz")):
        stamp = stamps / f"{part.name}.sha256"
        digest = _sha256(part)
        if stamp.is_file() and stamp.read_text().strip() == digest:
            _say(f"{part}: already unpacked into {stage}")
            continue
        with tarfile.open(part, "r:xz") as tar:
            for m in tar.getmembers():
                if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise ValueError(f"{part}: refusing member {m.name!r} (not a plain relative file)")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(stage, **kwargs)
        stamp.write_text(digest + "\n")
        _say(f"{part}: unpacked into {stage}")
    manifests = [json.loads(p.read_text()) for p in sorted(stamps.glob("part*.json"))]
    unpacked = sorted(m["part"] for m in manifests)
    last = next((m["part"] for m in manifests if m["last"]), None)
    _join_pieces(stage)
    waiting = sorted(str(p.relative_to(stage)) for p in stage.rglob("*.piece-*-of-*"))
    complete = last is not None and unpacked == list(range(1, last + 1)) and not waiting
    wheel = manifests[0]["wheel"] if manifests else None
    return {"wheel": wheel, "unpacked": unpacked, "parts": last, "waiting": waiting, "complete": complete}


def _join_pieces(stage: Path) -> None:
    """PATH.piece-1-of-N ... PATH.piece-N-of-N -> PATH, once all N are there."""
    groups: dict[tuple[Path, int], dict[int, Path]] = {}
    for piece in stage.rglob("*.piece-*-of-*"):
        base, _, tail = piece.name.rpartition(".piece-")
        i, _, n = tail.partition("-of-")
        groups.setdefault((piece.with_name(base), int(n)), {})[int(i)] = piece
    for (target, n), pieces in groups.items():
        if sorted(pieces) != list(range(1, n + 1)):
            continue  # the rest comes with a later part
        tmp = target.with_name(target.name + ".joining")
        with open(tmp, "wb") as out:
            for i in range(1, n + 1):
                with open(pieces[i], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        os.chmod(tmp, pieces[1].stat().st_mode & 0o777)
        tmp.replace(target)
        for p in pieces.values():
            p.unlink()


def verify_record(site: Path, wheel_name: str) -> list[str]:
    """Files of the wheel's RECORD missing from `site` or different (size, sha256); [] when all match."""
    dist, version = wheel_name.split("-")[:2]
    record = site / f"{dist}-{version}.dist-info" / "RECORD"
    if not record.is_file():
        return [f"{record} is missing"]
    bad = []
    for row in csv.reader(record.read_text().splitlines()):
        if not row or not row[1]:
            continue  # RECORD lists itself without a hash
        path, (algo, _, want), size = site / row[0], row[1].partition("="), row[2]
        if not path.is_file():
            bad.append(f"{row[0]}: missing")
            continue
        got = base64.urlsafe_b64encode(hashlib.new(algo, path.read_bytes()).digest()).rstrip(b"=").decode()
        if got != want or (size and int(size) != path.stat().st_size):
            bad.append(f"{row[0]}: differs from the wheel")
    return bad


def merge(stage: Path, site: Path) -> int:
    """Hard-link (or copy) every file of `stage` into `site`, beside what pip put there."""
    n = 0
    for src in stage.rglob("*"):
        rel = src.relative_to(stage)
        if rel.parts[0] == MANIFEST_DIR or not src.is_file():
            continue
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        n += 1
    return n


def pythonpath(site: Path) -> list[str]:
    paths = [str(site)]
    dsl = site / "nvidia_cutlass_dsl" / "dsl_packages"
    if dsl.is_dir():  # what nvidia_cutlass_dsl_packages.pth adds in a real site-packages
        paths.append(str(dsl))
    return paths


def install(root: Path, site: Path, stage: Path, check: bool) -> int:
    libs, wheels = root / "fa4-libs", root / "wheels"
    if not libs.is_dir() and not wheels.is_dir():
        _say(f"wheels install: nothing to install: neither {libs} nor {wheels} is here (carry them)")
        return 2
    state = unpack_parts(libs, stage) if libs.is_dir() else None
    if state is not None and not state["complete"]:
        _say(
            f"fa4-libs: part(s) {', '.join(map(str, state['unpacked'])) or 'none'} of "
            f"{state['parts'] or 'more'} unpacked into {stage}"
            + (f", {len(state['waiting'])} pieces waiting for the rest" if state["waiting"] else "")
            + ": carry the rest and run install again (FlashAttention-4 cannot import before that)"
        )
    whls = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if whls:
        site.mkdir(parents=True, exist_ok=True)
        # --upgrade: a second install replaces what the first put there (without it pip skips every
        # folder that exists); the libs are merged in again just after.
        cmd = [
            sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--upgrade", "--target", str(site), *map(str, whls),
        ]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            _say(f"wheels install: pip install of the {len(whls)} wheels of {wheels} failed")
            return 1
        _say(f"{wheels}: {len(whls)} wheels installed into {site}")
    if state is not None and state["complete"]:
        if not (site / "nvidia_cutlass_dsl").is_dir():
            _say(f"fa4-libs: complete in {stage}; merged into {site} once {wheels} is installed there")
        else:
            n = merge(stage, site)
            bad = verify_record(site, state["wheel"])
            if bad:
                _say(
                    f"fa4-libs: {len(bad)} files differ from {state['wheel']}'s RECORD: {'; '.join(bad[:5])}"
                )
                return 1
            _say(f"fa4-libs: {n} files of {state['wheel']} merged into {site}, each as its RECORD says")
    paths = pythonpath(site)
    status = 0
    if check:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]))
        for module in IMPORTS:
            run = subprocess.run(
                [sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True
            )
            last = (run.stderr.strip().splitlines() or [""])[-1]
            _say(f"import {module}: {'ok' if run.returncode == 0 else 'FAILED: ' + last}")
            status = status or (1 if run.returncode else 0)
    print("export PYTHONPATH=" + ":".join(paths) + "${PYTHONPATH:+:$PYTHONPATH}")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="bash bench/wheels.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: download the wheels and split the libs wheel into xz parts")
    p.add_argument("dir", nargs="?", default=".whl/fa4", help="where (default .whl/fa4)")
    p.add_argument("--part-mb", type=float, default=PART_MB, help=f"largest part in MB (default {PART_MB})")
    p.add_argument(
        "--piece-mb", type=float, default=PIECE_MB, help=f"largest piece in MB (default {PIECE_MB})"
    )
    i = sub.add_parser("install", help="there: unpack the parts present, pip install the wheels")
    i.add_argument("dir", nargs="?", default=".whl/fa4", help="what pack made (default .whl/fa4)")
    i.add_argument(
        "--site", default=os.environ.get("SITE", "/tmp/site"), help="install target (default /tmp/site)"
    )
    i.add_argument("--stage", default=None, help="where the parts are unpacked first (default SITE.parts)")
    i.add_argument("--check", action="store_true", help=f"then import {', '.join(IMPORTS)}")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if args.command == "pack":
        if not 0 < args.piece_mb < args.part_mb:
            parser.error(f"need 0 < --piece-mb < --part-mb, got {args.piece_mb} and {args.part_mb}")
        if root.exists() and not root.is_dir():
            parser.error(f"{root} is a file, not a folder")
        return pack(root, args.part_mb, args.piece_mb)
    if not root.is_dir():
        parser.error(f"{root} is not a folder: run 'bash bench/wheels.sh pack {root}' here and carry it")
    site = Path(args.site)
    stage = Path(args.stage) if args.stage else site.with_name(site.name + ".parts")
    return install(root, site, stage, args.check)


if __name__ == "__main__":
    sys.exit(main())
