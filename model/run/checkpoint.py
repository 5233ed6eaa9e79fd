"""Training state checked and saved: in memory (priming's snapshot, checked to be restored exactly) and on
disk (runs/<run id>/ckpt/step_NNNNNN/: rank{r}.pt of every rank, then meta.json once all are written).

A checkpoint directory without meta.json is incomplete and is never resumed; every file is written to a
temporary name and renamed. Rank 0's file holds the weights and the EMA (the same on every rank); each
rank's file holds its optimizer states (a sharded Muon's momentum is per rank) and its loaders' positions.
meta.json holds the size and sha256 of every rank's file, checked before a file is loaded: a damaged
file is refused, naming it and the previous checkpoint. A checkpoint the disk has no room for is skipped
(the error names the path and the bytes it needs; the previous one is kept) and training continues.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from optim.distributed import Dist

from ..atomic import atomic_write
from ..run_config import Config, config_hash, read_saved_json
from .shipped_code import code_hash

# ---------------------------------------------------------------------------------------------------------
# In memory: priming's snapshot
# ---------------------------------------------------------------------------------------------------------


def check_restored(model, opts, snap: tuple[dict, dict]) -> None:
    """After priming (model/pipeline.py's Trainer.prime) loaded its snapshot back: weights and optimizer
    states are exactly what it holds (optimizer state created after it, such as kept buffers, is zero)."""
    model_snap, opt_snap = snap
    _assert_restored(model, model_snap, opts.state_dict(), opt_snap)


def _assert_restored(model, model_snap: dict, opt_state, opt_snap) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_snap[k]), f"priming restore: model tensor {k} differs from the snapshot"

    def same(a, b, where: str) -> None:
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and torch.equal(a, b), f"priming restore: {where} differs"
        elif isinstance(b, dict):
            for k in set(a) | set(b):
                if k not in b:  # state created by priming (kept buffers) must be reset to zero
                    _assert_zero(a[k], f"{where}.{k}")
                else:
                    assert k in a, f"priming restore: {where}.{k} is missing"
                    same(a[k], b[k], f"{where}.{k}")
        elif isinstance(b, list | tuple):
            assert len(a) == len(b), f"priming restore: {where} length differs"
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b, f"priming restore: {where} is {a!r}, expected {b!r}"

    same(opt_state, opt_snap, "optimizer")


def _assert_zero(obj, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        assert not obj.any(), f"priming restore: {where} is not zero"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _assert_zero(v, f"{where}.{k}")
    else:
        raise AssertionError(f"priming restore: {where} exists only after priming")


# ---------------------------------------------------------------------------------------------------------
# On disk
# ---------------------------------------------------------------------------------------------------------


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
KEEP_FREE = 16 * 2**20  # bytes a checkpoint leaves free on its disk, so that the run's log can still grow


def _write(path: Path, data) -> str | None:
    """Write ``data`` to ``path`` atomically; None, or why the disk could not take it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    full = f"{path}: disk full, {len(data):,} bytes needed"
    if free < len(data) + KEEP_FREE:
        return f"{full}, {free:,} free (a checkpoint leaves {KEEP_FREE // 2**20} MiB free for the log)"
    try:
        with atomic_write(path) as f:
            f.write(data)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        return f"{full} ({exc.strerror}; {shutil.disk_usage(path.parent).free:,} bytes free now)"
    return None


def save_checkpoint(ckdir: Path, pd: Dist, *, model, ema, opts, batches, meta: dict, log) -> Path | None:
    """Write this rank's file, then (rank 0, once every rank is done) ``meta`` with every file's size and
    sha256 as meta.json. Disk full on any rank: nothing of this checkpoint is kept, the error is logged
    and None returned (the previous checkpoint stays the latest; the caller's run goes on)."""
    payload = {"optimizers": opts.state_dict(), "loaders": batches.state_dict(), "rank": pd.rank}
    if pd.main:
        payload.update(model=model.state_dict(), ema=ema.state_dict(), looping=bool(model.looping))
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    results = pd.all_gather_object(_write(ckdir / f"rank{pd.rank}.pt", data) or entry)
    del data
    problems = [r for r in results if isinstance(r, str)]
    if pd.main and not problems:
        files = {f"rank{r}.pt": e for r, e in enumerate(results)}
        problem = _write(
            ckdir / "meta.json", (json.dumps({**meta, "files": files}, indent=2, default=str) + "\n").encode()
        )
        problems += [problem] if problem else []
    if pd.main and problems:  # an incomplete checkpoint is never resumed: take back what was written
        for name in ["meta.json"] + [f"rank{r}.pt" for r, e in enumerate(results) if isinstance(e, dict)]:
            (ckdir / name).unlink(missing_ok=True)
        if ckdir.is_dir() and not any(ckdir.iterdir()):
            ckdir.rmdir()
        prev = previous_checkpoint(ckdir)
        log(
            f"ERROR: checkpoint {ckdir} not written: "
            + "; ".join(problems)
            + ". The previous checkpoint ("
            + (str(prev) if prev else "none")
            + ") is kept; training continues: free space for the next one."
        )
    elif pd.main:
        log(f"checkpoint: {ckdir}")
    pd.barrier()
    return None if pd.any(bool(problems)) else ckdir


def previous_checkpoint(ckdir: Path) -> Path | None:
    """The latest complete checkpoint (with meta.json) beside ``ckdir`` at an earlier step, if any."""
    earlier = [
        p
        for p in ckdir.parent.glob("step_*")
        if p.name < ckdir.name and (p / "meta.json").is_file() and p.resolve() != ckdir.resolve()
    ]
    return max(earlier, default=None)


def verify_checkpoint_file(path: Path, rank: int, meta: dict) -> str | None:
    """Check rank{rank}.pt against the size and sha256 in meta.json; refuse a damaged file, naming it and
    the previous checkpoint. Returns a note for a checkpoint written before checksums existed."""
    name = f"rank{rank}.pt"
    file = path / name
    expected = (meta.get("files") or {}).get(name)
    if not file.is_file():
        raise SystemExit(f"{file}: missing from the checkpoint; {_instead(path)}")
    if expected is None:
        return f"{file}: no checksum in {path / 'meta.json'} (an older checkpoint): loaded unverified"
    h, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
            size += len(chunk)
    if size != expected["bytes"] or h.hexdigest() != expected["sha256"]:
        raise SystemExit(
            f"{file}: damaged: {size:,} bytes, sha256 {h.hexdigest()[:16]}..., but meta.json says "
            f"{expected['bytes']:,} bytes, sha256 {expected['sha256'][:16]}...; {_instead(path)}"
        )
    return None


def _instead(path: Path) -> str:
    prev = previous_checkpoint(path)
    if prev is None:
        return f"there is no earlier complete checkpoint in {path.parent}: start the run again"
    return f"use the previous checkpoint instead: --resume {prev} (or --eval-only {prev})"


# What check_resume and the loaders read from meta.json, with their types.
META_FIELDS = {
    "step": int, "elapsed_s": (int, float), "world_size": int, "grad_accum_steps": int, "config": dict,
    "config_hash": str, "code_hash": str,
}  # fmt: skip


def checkpoint_meta(cfg: Config, pd: Dist, accum: int, step: int, elapsed_s: float) -> dict:
    """meta.json's first part: where the run stands, its layout and config (the caller adds code_hash,
    run_id and record_eligible; check_resume compares them)."""
    return {
        "step": step,
        "elapsed_s": elapsed_s,
        "world_size": pd.world,
        "grad_accum_steps": accum,
        "config": asdict(cfg),
        "config_hash": config_hash(cfg),
    }


def read_checkpoint_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise SystemExit(
            f"{path}: not a complete checkpoint (no meta.json); pass a directory runs/<id>/ckpt/step_NNNNNN "
            "written by --save-every"
        )
    meta = read_saved_json(meta_path, "the checkpoint is damaged: " + _instead(path))
    bad = [k for k, kind in META_FIELDS.items() if not isinstance(meta.get(k), kind)]
    if bad:
        raise SystemExit(f"{meta_path}: missing or malformed {', '.join(bad)}; {_instead(path)}")
    return meta


def check_resume(meta: dict, cfg: Config, pd: Dist, accum: int, force: bool) -> list[str]:
    """Refuse a checkpoint of another config or code unless forced; returns the reasons it was forced."""
    if meta["world_size"] != pd.world or meta["grad_accum_steps"] != accum:
        raise SystemExit(
            f"checkpoint was written by {meta['world_size']} process(es) with grad accumulation "
            f"{meta['grad_accum_steps']}; this run has {pd.world} and {accum}: resume with the same layout"
        )
    problems = []
    if meta["config_hash"] != config_hash(cfg):
        saved, now = meta["config"], asdict(cfg)
        diff = {
            k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
        }
        problems.append(f"config differs (checkpoint, now): {diff}")
    if meta["code_hash"] != code_hash():
        problems.append("the shipped source files changed since the checkpoint (code hash differs)")
    if problems and not force:
        raise SystemExit("refusing to resume: " + "; ".join(problems) + ". Pass --force to resume anyway.")
    return problems


def load_checkpoint(path: Path, pd: Dist, *, model, ema, opts=None) -> dict | None:
    """Weights, EMA and loop mode (from rank 0's file, broadcast) and, with `opts`, this rank's optimizer
    states; each file is checked against its checksum first. Without `opts` (evaluating a checkpoint) only
    rank 0's file is read, so any number of processes can evaluate it. Returns this rank's payload (None
    on the other ranks without `opts`): its "loaders" are restored by the caller once priming is done."""
    meta = read_checkpoint_meta(path)
    payload = None
    if opts is not None or pd.main:
        rank = pd.rank if opts is not None else 0
        verify_checkpoint_file(path, rank, meta)
        payload = torch.load(path / f"rank{rank}.pt", map_location=pd.device, weights_only=False)
    if pd.main:
        model.load_state_dict(payload["model"])
        ema.load_state_dict(payload["ema"])
    pd.broadcast_(list(model.state_dict().values()) + list(ema.shadow.values()))
    model.set_looping(pd.broadcast_object(bool(payload["looping"]) if pd.main else False))
    if opts is not None:
        opts.load_state_dict(payload["optimizers"])
    return payload
