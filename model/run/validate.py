"""The start-up checks of a run: one pass after the config is resolved and before any model is built or
any file is written, so that a bad input costs seconds and leaves nothing behind (README "What a bad
input gets"). In order:

  what is evaluated or resumed exists   --eval-only / --resume paths, meta.json and config.json readable;
                                        a resume has the checkpoint's layout, config and code (or --force)
                                        and steps left to train
  the config                            every field of its type, choices and range, named by its variable or
                                        flag (model/run_config.py); look-alike env variables get a warning
  the machine                           a CPU run of a config that needs more than CPU_LARGE_BYTES (or than
                                        the memory available) asks for --allow-large-cpu; kernels asked for
                                        by name can run here
  the run folder                        --out-dir writable, one folder name inside it, never a folder of
                                        another run (model/run_folder.py)
  checkpoint / artifact                 checksums of the checkpoint's files; the artifact readable; either
                                        holds every tensor of this model, in its shape
  data                                  the tokenizer's pieces == the model's vocab; every val and train id
                                        < vocab (a vectorised max over each memory-mapped shard); enough
                                        shards of enough tokens for every data rank; the byte tables audited

A refusal is a SystemExit whose message names the file, variable or flag and says what to do; with
several processes every rank stops. Only then is the run folder made (or, for a resumed run, tidied),
and the lines logged so far go to its train.log; any error after that lands in train.log too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from optim.distributed import Dist

from ..config import GPTConfig
from ..data import RunData, ShardError, check_token_ids, load_run_data, read_shard_header
from ..data.shards import describe_files
from ..gpt import GPT
from ..run_config import Config, batch_layout, config_for_run, model_config, run_preset, unknown_env_warnings
from . import checkpoint
from .report import Logger
from .run_folder import RunFolder, choose, default_run_id

CPU_LARGE_BYTES = 8 * 2**30  # a CPU run estimated above this needs --allow-large-cpu


@dataclass
class Startup:
    cfg: Config
    mcfg: GPTConfig
    data: RunData
    run_id: str
    run_dir: Path
    folder: RunFolder | None  # rank 0 holds the locked folder
    eval_only: Path | None
    resume: Path | None
    meta: dict | None  # the checkpoint's meta.json (resume, or eval-only of a checkpoint)
    forced: list[str]  # what --force resumed past (config or code differences)
    preset: str  # the preset the run stands for (of what it evaluates or resumes: run_config.run_preset)


def startup(args, cli: dict, cli_model: dict, pd: Dist, log: Logger) -> Startup:
    t0 = time.perf_counter()
    eval_only, resume, meta = saved_run(args)
    for warning in unknown_env_warnings():
        log(f"WARNING: {warning}")
    cfg = config_for_run(args.preset, cli, cli_model, eval_only, meta)
    preset = run_preset(args.preset, eval_only, meta)
    try:
        mcfg = model_config(cfg, pd.device)
    except ValueError as exc:
        raise SystemExit(f"{exc} (set by --model-* flags or environment variables)") from None
    accum, _ = batch_layout(cfg, pd.world)
    check_memory(cfg, mcfg, pd, accum, eval_only is not None, args.device, args.allow_large_cpu, log)
    check_kernels_can_run(mcfg, pd.device)
    forced = check_resumable(resume, meta, cfg, pd, accum, args.force) if resume else []

    decision, folder = None, None
    if pd.main:  # rank 0 looks at the folder (and locks a continued run's); every rank gets its answer
        try:
            decision = choose(args.out_dir, args.run_id, default_run_id(preset, cfg.seed), resume)
            if decision[2]:  # its log exists: what goes wrong from here on lands in it too
                folder = RunFolder(decision[1], continuing=True)
                log.attach(decision[1])
        except SystemExit as exc:
            decision = str(exc.code)
    decision = pd.broadcast_object(decision)
    if isinstance(decision, str):
        raise SystemExit(decision)
    run_id, run_dir, continuing = decision

    # resuming reads every rank's file; evaluating a checkpoint reads rank 0's weights alone (any world size)
    saved = resume or (eval_only if eval_only and eval_only.is_dir() and pd.main else None)
    rank_file = pd.rank if resume else 0
    notes = _on_every_rank(
        pd, lambda: checkpoint.verify_checkpoint_file(saved, rank_file, meta) if saved else None
    )
    if notes:
        log(f"WARNING: {notes}")
    _on_every_rank(pd, lambda: check_checkpoint_model(saved, mcfg) if saved and pd.main else None)
    artifact = eval_only if eval_only and eval_only.is_file() and pd.main else None
    _on_every_rank(pd, lambda: check_artifact(artifact, mcfg) if artifact else None)
    data = _on_every_rank(pd, lambda: _load_data(cfg, args.data, mcfg.vocab_size, pd, accum, log))

    def open_folder() -> RunFolder | None:
        if not pd.main:
            return None
        if folder is None:
            made = RunFolder(run_dir, continuing=False)
            log.attach(run_dir)
            return made
        if resume is not None:
            lines, kept = folder.resume_at(meta["step"])
            for line in lines:
                log(f"run folder: {line}")
            log.records = kept  # the plots cover the whole run
        return folder

    folder = _on_every_rank(pd, open_folder)  # a refusal on rank 0 (folder taken) stops every rank
    seconds = time.perf_counter() - t0
    log(f"start-up checks passed in {seconds:.2f} s (config, paths, memory, run folder, data, byte tables)")
    return Startup(cfg, mcfg, data, run_id, run_dir, folder, eval_only, resume, meta, forced, preset)


def check_resumable(resume: Path, meta: dict, cfg: Config, pd: Dist, accum: int, force: bool) -> list[str]:
    """Before the run folder is touched (a refused resume changes nothing in it): the same layout, the
    same config and code unless forced, and steps left to train."""
    forced = checkpoint.check_resume(meta, cfg, pd, accum, force)
    if meta["step"] >= cfg.iterations:
        raise SystemExit(
            f"--resume {resume}: the checkpoint is at step {meta['step']} of {cfg.iterations}: nothing is "
            f"left to train; evaluate it with --eval-only {resume}, or raise ITERATIONS (with --force)"
        )
    return forced


def check_kernels_can_run(mcfg: GPTConfig, device: torch.device) -> None:
    """Kernels asked for by name (KERNELS=triton or an *_IMPL variable) are refused where they cannot run
    ("auto" takes the references there)."""
    from kernels._runtime import platform_blocker
    from model.config import KERNEL_IMPL_FIELDS

    named = [name for name in KERNEL_IMPL_FIELDS if getattr(mcfg, name) == "triton"]
    reason = platform_blocker(device.type, device.index or 0) if named else None
    if reason:
        raise SystemExit(
            f"config {', '.join(named)}='triton' (KERNELS or its *_IMPL variable): the fused kernels cannot "
            f"run here ({reason}); use KERNELS=auto (the references where they cannot run) or KERNELS=torch"
        )


def _on_every_rank(pd: Dist, fn):
    """fn() on every rank; when it refuses on any rank, every rank stops (none waits for the others)."""
    try:
        out, err = fn(), None
    except SystemExit as exc:
        out, err = None, exc
    if pd.any(err is not None):
        raise err or SystemExit(f"rank {pd.rank}: another rank refused to start (its message says why)")
    return out


def saved_run(args) -> tuple[Path | None, Path | None, dict | None]:
    """(--eval-only path, --resume path, the checkpoint's meta.json), checked before anything else."""
    eval_only = Path(args.eval_only) if args.eval_only else None
    resume = Path(args.resume) if args.resume else None
    if eval_only and (resume or args.train_only):
        raise SystemExit("--eval-only evaluates; it takes neither --resume nor --train-only")
    if eval_only and not eval_only.exists():
        raise SystemExit(
            f"--eval-only {eval_only}: no such file or directory; pass an artifact (runs/<run id>/"
            "final_model.ptz) or a checkpoint directory (runs/<run id>/ckpt/step_NNNNNN)"
        )
    if resume and not resume.is_dir():
        raise SystemExit(
            f"--resume {resume}: not a directory; pass a checkpoint directory runs/<run id>/ckpt/step_NNNNNN"
        )
    saved = resume or (eval_only if eval_only and eval_only.is_dir() else None)
    return eval_only, resume, checkpoint.read_checkpoint_meta(saved) if saved else None


def estimate_memory(cfg: Config, mcfg: GPTConfig, world: int, accum: int, training: bool) -> dict:
    """A rough peak of one process, in bytes: weights, gradients, EMA and optimizer state (20 B per
    parameter; weights only, and TTT's gradients, when evaluating), activations of one micro-batch
    ((6 x model_dim + 3 x mlp_hidden) values per token per layer run, loops included) and its fp32 logits
    with their gradient. For the record config on one GPU (accum 8) it says 35.4 GiB: measured 35.0."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(mcfg).parameters())
    layers = mcfg.num_layers + (
        mcfg.num_loops * (mcfg.loop_end - mcfg.loop_start + 1) if mcfg.num_loops else 0
    )
    if training:
        tokens = cfg.train_batch_tokens // (world * accum)
    else:
        tokens = max(cfg.val_batch_seqs, cfg.ttt_batch_seqs) * cfg.eval_seq_len
    act = 2 if cfg.embed_dtype == "bfloat16" else 4
    parts = {
        "state": params * (20 if training else 8),
        "activations": tokens * layers * (6 * mcfg.model_dim + 3 * mcfg.mlp_hidden) * act,
        "logits": tokens * mcfg.vocab_size * 8,
    }
    return {"params": params, "tokens": tokens, "parts": parts, "total": sum(parts.values())}


def available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg, mcfg, pd: Dist, accum: int, eval_only: bool, device_arg: str, allow: bool, log) -> dict:
    """On a CPU, refuse a config that needs more than CPU_LARGE_BYTES or than the memory available (the
    record config would be OOM-killed, or take days) unless --allow-large-cpu; say what it needs."""
    est = estimate_memory(cfg, mcfg, pd.world, accum, training=not eval_only)
    gib = {k: v / 2**30 for k, v in est["parts"].items()}
    need = (
        f"about {est['total'] / 2**30:.1f} GiB per process (model {cfg.model_preset}: {est['params']:,} "
        f"parameters, {est['tokens']:,} tokens per micro-batch; state {gib['state']:.1f} + activations "
        f"{gib['activations']:.1f} + logits {gib['logits']:.1f} GiB, a rough estimate)"
    )
    if pd.device.type == "cpu":
        avail = available_memory()
        large = est["total"] > CPU_LARGE_BYTES or (avail is not None and est["total"] > avail)
        have = f"; this machine has {avail / 2**30:.1f} GiB available" if avail else ""
        if large and not allow:
            why = (
                "no CUDA device is visible, so it would run on the CPU"
                if device_arg == "auto"
                else "--device cpu was asked for"
            )
            raise SystemExit(
                f"this config needs {need}{have}, and {why}: it would be killed for memory or take days. "
                "A run that fits a CPU: python train.py --preset tiny --device cpu. To run this config on "
                "the CPU anyway: --device cpu --allow-large-cpu"
            )
        if large:
            log(f"WARNING: --allow-large-cpu: this config needs {need}{have}")
    return est


def check_artifact(path: Path, mcfg: GPTConfig) -> None:
    """The artifact is readable (its CRC holds) and holds every tensor of this config's model, in its shape
    (read from the stored tensors: an int6 matrix's codes have the matrix's shape; nothing is dequantised)."""
    from ..quant import ArtifactError, read_artifact

    try:
        tensors, meta = read_artifact(path)
    except ArtifactError as exc:
        raise SystemExit(str(exc)) from None
    shapes = {n: tensors[n if info["s"] == "pt" else n + ".q"].shape for n, info in meta.items()}
    with torch.device("meta"):
        template = GPT(mcfg).unbanked_state_dict()
    fix = "its run's config.json is not beside it or flags change the model; pass the flags of the run that "
    _matches_model(path, "the artifact", shapes, template, fix + "made it (--preset, --model-*)")


def check_checkpoint_model(path: Path, mcfg: GPTConfig) -> None:
    """The checkpoint's weights (rank 0's file, memory-mapped) have the shapes of this config's model."""
    payload = torch.load(path / "rank0.pt", map_location="cpu", mmap=True, weights_only=False)
    with torch.device("meta"):
        template = GPT(mcfg).state_dict()
    shapes = {n: t.shape for n, t in payload["model"].items()}
    fix = "flags change the model; drop the --model-* flags that differ from its run"
    _matches_model(path / "rank0.pt", "the checkpoint", shapes, template, fix)


def _matches_model(path: Path, what: str, shapes: dict, template: dict, fix: str) -> None:
    """Every tensor of `template` is among the saved `shapes`, in its shape; else a refusal naming `path`."""
    missing = sorted(set(template) - set(shapes))
    if missing:
        raise SystemExit(
            f"{path}: {what} lacks {len(missing)} tensors of the model this config builds (e.g. "
            f"{missing[:3]}): {fix}"
        )
    wrong = [
        f"{n} {tuple(shapes[n])} vs {tuple(t.shape)}" for n, t in template.items() if shapes[n] != t.shape
    ]
    if wrong:
        raise SystemExit(
            f"{path}: {len(wrong)} tensors have other shapes than the model this config builds (saved vs "
            f"now, e.g. {wrong[:2]}): {fix}"
        )


def _load_data(cfg: Config, data_dir: str | None, vocab: int, pd: Dist, accum: int, log) -> RunData:
    try:
        data = load_run_data(cfg, data_dir, vocab, pd.main, log)
        check_train_shards(data, cfg, vocab, pd, accum, log)
    except (ShardError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    return data


def check_train_shards(data: RunData, cfg: Config, vocab: int, pd: Dist, accum: int, log) -> None:
    """Every train shard's header and size; enough shards, of enough tokens, for every data rank; and
    every token id < vocab_size, scanned on this rank's share of the shards (files[rank::world])."""
    files = data.paths.train_files()
    counts = [read_shard_header(f) for f in files]
    data_ranks = pd.world * accum
    if len(files) < data_ranks:
        raise SystemExit(
            f"{len(files)} train shard(s) in {data.paths.dataset_dir} for {data_ranks} data ranks (world "
            f"{pd.world} x accum {accum}): each reads its own shards; download more (--train-shards "
            f">= {data_ranks}) or run on fewer processes"
        )
    for d in range(data_ranks):
        if max(counts[d::data_ranks]) < cfg.train_seq_len + 1:
            raise SystemExit(
                f"data rank {d}: no train shard of {describe_files(files[d::data_ranks])} holds "
                f"train_seq_len+1 = {cfg.train_seq_len + 1} tokens: use a shorter TRAIN_SEQ_LEN or more data"
            )
    mine = files[pd.rank :: pd.world]
    t0 = time.perf_counter()
    scanned = sum(check_token_ids(f, vocab) for f in mine)
    seconds = time.perf_counter() - t0
    log(
        f"data: {len(files)} train shards, {sum(counts):,} tokens | ids < {vocab} checked on this rank's "
        f"{len(mine)} ({scanned:,} tokens) in {seconds:.3f} s ({scanned / max(seconds, 1e-9) / 1e9:.2f} G "
        "tokens/s)"
    )
