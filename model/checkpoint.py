"""Training state saved and restored: in memory (priming's snapshot, restored exactly and checked) and on
disk (runs/<run id>/ckpt/step_NNNNNN/: rank{r}.pt of every rank, then meta.json once all are written).

A checkpoint directory without meta.json is incomplete and is never resumed; every file is written to a
temporary name and renamed. Rank 0's file holds the weights and the EMA (the same on every rank); each
rank's file holds its optimizer states (a sharded Muon's momentum is per rank) and its loaders' positions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from optim.distributed import Dist

from .atomic import atomic_write, write_json
from .run_config import Config, config_hash
from .shipped_code import code_hash

# ---------------------------------------------------------------------------------------------------------
# In memory: priming's snapshot
# ---------------------------------------------------------------------------------------------------------


def snapshot(model, opts) -> tuple[dict, dict]:
    """Copies of the weights and of every optimizer state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, _clone_state(opts.state_dict())


def restore(model, opts, snap: tuple[dict, dict]) -> None:
    """Load a snapshot back and check that weights and optimizer states are exactly what it holds
    (optimizer state created after it, such as kept buffers, must be zero)."""
    model_snap, opt_snap = snap
    model.load_state_dict(model_snap)
    opts.load_state_dict(opt_snap)
    _assert_restored(model, model_snap, opts.state_dict(), opt_snap)


def _clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone_state(v) for v in obj)
    return obj


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


def save_checkpoint(ckdir: Path, pd: Dist, *, model, ema, opts, batches, meta: dict, log) -> Path:
    """Write this rank's file, then (rank 0, once every rank is done) ``meta`` as meta.json."""
    payload = {"optimizers": opts.state_dict(), "loaders": batches.state_dict(), "rank": pd.rank}
    if pd.main:
        payload.update(model=model.state_dict(), ema=ema.state_dict(), looping=bool(model.looping))
    with atomic_write(ckdir / f"rank{pd.rank}.pt") as f:
        torch.save(payload, f)
    pd.barrier()
    if pd.main:
        write_json(ckdir / "meta.json", meta)
        log(f"checkpoint: {ckdir}")
    pd.barrier()
    return ckdir


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
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{meta_path}: not valid JSON ({exc}); the checkpoint is damaged") from exc


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


def load_checkpoint(path: Path, pd: Dist, *, model, ema, opts) -> dict:
    """Weights, EMA and loop mode (from rank 0's file, broadcast) and this rank's optimizer states.
    Returns this rank's payload: its "loaders" are restored by the caller once priming is done."""
    payload = torch.load(path / f"rank{pd.rank}.pt", map_location=pd.device, weights_only=False)
    if pd.main:
        model.load_state_dict(payload["model"])
        ema.load_state_dict(payload["ema"])
    pd.broadcast_(list(model.state_dict().values()) + list(ema.shadow.values()))
    model.set_looping(pd.broadcast_object(bool(payload["looping"]) if pd.main else False))
    opts.load_state_dict(payload["optimizers"])
    return payload
