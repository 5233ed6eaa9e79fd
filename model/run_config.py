"""The run configuration: the #1523 training hyper-parameters beside the model's (model/config.py), the
presets, and how environment variables and command-line flags override them.

A preset (`record`, `tiny`) is overridden by environment variables named like the fields in upper case
(SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS, TTT_ENABLED, MUON_MOMENTUM, ...; GPTConfig fields too, e.g.
QK_GAIN_INIT), then by CLI flags (--matrix-lr 0.03, --model-num-layers 9).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import GPTConfig, get_config
from .evaluate import TTTConfig


@dataclass
class Config:
    # model (model/config.py presets; GPTConfig fields are overridden through model_overrides)
    model_preset: str = "record"
    model_overrides: dict = field(default_factory=dict)
    embed_dtype: str = "bfloat16"  # the tied embedding's master dtype; it sets the activation dtype
    kernels: str = "auto"  # fused MLP / softcapped CE / attention: auto | triton | torch (reference)
    muon_impl: str = "banked"  # banked (ours) | per_matrix (one Muon per 2-D matrix: the reference)
    compile: str = "auto"  # torch.compile the model: auto (on CUDA) | on | off
    muon_graphs: bool = True  # banked Muon's compiled, CUDA-graphed step (False: its eager step)
    # Prove the kernels before priming (model/preflight.py): on (a failing kernel is replaced by its
    # reference) | strict (a failing kernel refuses the run) | off (not checked; the report says so)
    preflight: str = "on"
    # optimisers (SPEC §5.1-5.2)
    matrix_lr: float = 0.022
    scalar_lr: float = 0.02
    tied_embed_lr: float = 0.03
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_row_normalize: bool = True
    muon_wd: float = 0.095
    embed_wd: float = 0.095
    adam_wd: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3  # per rank, on the local gradient (SPEC §5.6); <= 0: off
    ema_decay: float = 0.997
    # schedule (SPEC §5.4, §5.7)
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0  # <= 0: no wallclock cap (iterations bound the run)
    gptq_reserve_seconds: float = 12.0
    warmdown_frac: float = 0.667
    min_lr: float = 0.0
    enable_looping_at: float = 0.35
    warmup_steps: int = 20  # untimed priming steps per loop mode (compilation), undone afterwards
    # batch
    train_batch_tokens: int = 786432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0: 8 // world_size
    # validation and logging
    val_loss_every: int = 4000
    train_log_every: int = 500
    eval_seq_len: int = 2048
    eval_stride: int = 64
    val_batch_seqs: int = 32
    val_max_tokens: int = 0  # 0: the whole validation stream
    sliding_window_enabled: bool = True
    # artifact (SPEC §7)
    gptq_calibration_batches: int = 64
    quant_passthrough_max_numel: int = 65536
    matrix_clip_sigmas: float = 12.85  # SDClip k, int6 matrices: trades artifact size for error
    fit_artifact_to_cap: bool = True  # raise the int6 k above this if code + model would exceed the cap
    embed_clip_sigmas: float = 20.0  # SDClip k, int8 tied embedding
    # score-first TTT (SPEC §8.3)
    ttt_enabled: bool = True
    ttt_lr: float = 0.01
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32768
    ttt_momentum: float = 0.9
    ttt_grad_clip: float = 1.0
    ttt_batch_seqs: int = 32
    hash_embed_enabled: bool = True
    hash_embed_size: int = 16384
    seed: int = 1337


PRESETS: dict[str, Config] = {
    "record": Config(),
    # Every phase of the record on the tiny model, ~15 s on 2 CPU cores. Bounded by iterations
    # (no wallclock cap) so that it is deterministic; fp32 embedding (CPU bf16 matmuls are slow);
    # GPTQ on every matrix (the record's 65,536-element passthrough would skip all of them here).
    "tiny": Config(
        model_preset="tiny",
        embed_dtype="float32",
        train_batch_tokens=1024,
        train_seq_len=128,
        grad_accum_steps=1,
        iterations=120,
        max_wallclock_seconds=0.0,
        gptq_reserve_seconds=0.0,
        warmup_steps=2,
        muon_momentum_warmup_steps=20,
        val_loss_every=40,
        train_log_every=10,
        ema_decay=0.95,  # 0.997 would leave the EMA at ~70% of the initial weights after 120 steps
        eval_seq_len=128,
        val_batch_seqs=16,
        val_max_tokens=8192,
        gptq_calibration_batches=4,
        quant_passthrough_max_numel=1024,
        ttt_chunk_tokens=2048,
        ttt_epochs=2,
        ttt_batch_seqs=8,
        hash_embed_size=4096,
    ),
}

CHOICES = {
    "embed_dtype": ("bfloat16", "float32"),
    "kernels": ("auto", "triton", "torch"),
    "muon_impl": ("banked", "per_matrix"),
    "compile": ("auto", "on", "off"),
    "preflight": ("on", "strict", "off"),
}


def _convert(name: str, raw, default):
    """Parse an env/CLI string into the type of the field's default."""
    text = str(raw).strip()
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected 0/1/true/false")
        if isinstance(default, int):
            value = float(text)
            if value != int(value):
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(default, float):
            return float(text)
    except ValueError as e:
        raise ValueError(f"config {name}={raw!r}: {e}") from None
    return text


def model_fields() -> dict:
    """GPTConfig's fields and their defaults (each can be set by env NAME or --model-name)."""
    return {f.name: f.default for f in dataclasses.fields(GPTConfig)}


# Training fields that also exist in GPTConfig: the training value is used for both.
SHARED = ("train_seq_len", "hash_embed_size")


def resolve_config(
    preset: str, env: dict | None = None, cli: dict | None = None, cli_model: dict | None = None
) -> Config:
    """preset -> environment variables (FIELD_NAME in upper case) -> CLI values. Returns a Config."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    env = os.environ if env is None else env
    base = PRESETS[preset]
    values = asdict(base)
    overrides = dict(base.model_overrides)
    for f in dataclasses.fields(Config):
        if f.name == "model_overrides":
            continue
        if f.name.upper() in env:
            values[f.name] = _convert(f.name.upper(), env[f.name.upper()], getattr(base, f.name))
    for name, default in model_fields().items():
        if name not in SHARED and name.upper() in env:
            overrides[name] = _convert(name.upper(), env[name.upper()], default)
    for name, raw in (cli or {}).items():
        values[name] = _convert("--" + name.replace("_", "-"), raw, getattr(base, name))
    defaults = model_fields()
    for name, raw in (cli_model or {}).items():
        overrides[name] = _convert("--model-" + name.replace("_", "-"), raw, defaults[name])
    values["model_overrides"] = overrides
    cfg = Config(**values)
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"config {name}={getattr(cfg, name)!r}: expected one of {choices}")
    return cfg


def model_config(cfg: Config, device: torch.device):
    """The GPTConfig of this run: preset + overrides, the training sequence length, and the kernels."""
    impl = cfg.kernels
    if impl == "auto" and device.type == "cpu":
        # "auto" would run the Triton kernels in the interpreter when TRITON_INTERPRET=1 (minutes a step).
        impl = "torch"
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("mlp_impl", impl)
    overrides.setdefault("ce_impl", impl)
    # The reference kernels get PyTorch's own attention selection, as the record's script without FA3.
    overrides.setdefault("attn_impl", "sdpa" if impl == "torch" else "auto")
    return get_config(cfg.model_preset, train_seq_len=cfg.train_seq_len, **overrides)


def ttt_config(cfg: Config) -> TTTConfig:
    """The score-first TTT settings of this run (evaluation scores val_batch_seqs windows per forward)."""
    return TTTConfig(
        seq_len=cfg.eval_seq_len,
        stride=cfg.eval_stride,
        chunk_tokens=cfg.ttt_chunk_tokens,
        epochs=cfg.ttt_epochs,
        lr=cfg.ttt_lr,
        momentum=cfg.ttt_momentum,
        grad_clip=cfg.ttt_grad_clip,
        batch_seqs=cfg.ttt_batch_seqs,
        batch_windows=cfg.val_batch_seqs,
        hash_embed=cfg.hash_embed_enabled,
        hash_embed_size=cfg.hash_embed_size,
    )


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()


def batch_layout(cfg: Config, world: int) -> tuple[int, int]:
    """(gradient accumulation steps, sequences per micro-batch) of one rank. Training and GPTQ
    calibration both use it, so the calibration batches are the first training batches (SPEC §7.2)."""
    accum = cfg.grad_accum_steps or 8 // world
    per_micro = world * accum * cfg.train_seq_len
    if cfg.train_batch_tokens % per_micro:
        raise SystemExit(
            f"train_batch_tokens {cfg.train_batch_tokens} is not a multiple of world {world} x accum "
            f"{accum} x seq_len {cfg.train_seq_len}"
        )
    return accum, cfg.train_batch_tokens // per_micro


# ---------------------------------------------------------------------------------------------------------
# Command-line flags, and the config of a saved run
# ---------------------------------------------------------------------------------------------------------


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--<field> for every Config field and --model-<field> for every GPTConfig field."""
    for f in dataclasses.fields(Config):
        if f.name != "model_overrides":
            p.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None, metavar="V")
    for name in model_fields():
        if name not in SHARED:
            p.add_argument(
                "--model-" + name.replace("_", "-"), dest="model_" + name, default=None, metavar="V"
            )


def config_flags(args: argparse.Namespace) -> tuple[dict, dict]:
    """The config flags given on the command line: (Config values, GPTConfig values), as strings."""
    cli = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    cli_model = {k[6:]: v for k, v in vars(args).items() if k.startswith("model_") and v is not None}
    return cli, cli_model


def config_from(saved: dict, where: Path) -> Config:
    """The Config a run saved (config.json or checkpoint meta), or a clear error naming the file."""
    try:
        return Config(**saved["config"])
    except (KeyError, TypeError) as exc:
        raise SystemExit(
            f"{where}: its config does not match this train.py ({type(exc).__name__}: {exc}); "
            "evaluate it with the code version that wrote it, or pass the config as flags"
        ) from exc


def config_for_run(
    preset: str, cli: dict, cli_model: dict, eval_only: Path | None, meta: dict | None
) -> Config:
    """The config of this run: an evaluated artifact's (the config.json its run wrote beside it, unless
    flags are given) or checkpoint's (its meta.json), else the preset with env and flag overrides."""
    beside = eval_only.parent / "config.json" if eval_only and eval_only.is_file() else None
    if beside and beside.is_file() and not (cli or cli_model):
        return config_from(json.loads(beside.read_text(encoding="utf-8")), beside)
    if eval_only and meta is not None:
        return config_from(meta, eval_only / "meta.json")
    return resolve_config(preset, cli=cli, cli_model=cli_model)
