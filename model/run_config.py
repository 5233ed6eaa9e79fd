"""The run configuration: the #1523 training hyper-parameters beside the model's (model/config.py), the
presets, and how environment variables and command-line flags override them.

A preset (`record`, `tiny`) is overridden by environment variables named like the fields in upper case
(SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS, TTT_ENABLED, MUON_MOMENTUM, ...; GPTConfig fields too, e.g.
QK_GAIN_INIT), then by CLI flags (--matrix-lr 0.03, --model-num-layers 9). Every numeric field has a
range (RANGES, MODEL_RANGES) and a value outside it is refused naming the variable or flag it came from;
an environment variable that looks like a field but is none (SEQ_LEN) gets a warning naming the nearest.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kernels._runtime import IMPLS
from kernels.attention import IMPLS as ATTN_IMPLS

from .config import KERNEL_IMPL_FIELDS, GPTConfig, get_config
from .config import PRESETS as MODEL_PRESETS
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
    # Prove the kernels before priming (model/run/preflight.py): on (a failing kernel is replaced by its
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
    "model_preset": tuple(MODEL_PRESETS),
    "embed_dtype": ("bfloat16", "float32"),
    "kernels": ("auto", "triton", "torch"),
    "muon_impl": ("banked", "per_matrix"),
    "compile": ("auto", "on", "off"),
    "preflight": ("on", "strict", "off"),
}

# The range of every numeric field (an interval, inf: unbounded; a float must also be finite) and what
# the field is. A value outside it is refused before anything runs, naming the variable or flag it came
# from. tests/test_bad_inputs.py checks that every numeric field of Config and GPTConfig has one.
RANGES: dict[str, tuple[str, str]] = {
    "matrix_lr": ("[0, inf)", "a learning rate"),
    "scalar_lr": ("[0, inf)", "a learning rate"),
    "tied_embed_lr": ("[0, inf)", "a learning rate"),
    "muon_momentum": ("[0, 1)", "a momentum"),
    "muon_momentum_warmup_start": ("[0, 1)", "a momentum"),
    "muon_momentum_warmup_steps": ("[0, inf)", "steps (0: no warmup)"),
    "muon_backend_steps": ("[1, 100]", "Newton-Schulz iterations"),
    "muon_wd": ("[0, inf)", "a weight decay"),
    "embed_wd": ("[0, inf)", "a weight decay"),
    "adam_wd": ("[0, inf)", "a weight decay"),
    "beta1": ("[0, 1)", "an Adam beta"),
    "beta2": ("[0, 1)", "an Adam beta"),
    "adam_eps": ("(0, inf)", "Adam's epsilon"),
    "grad_clip_norm": ("(-inf, inf)", "a gradient norm (<= 0: no clipping)"),
    "ema_decay": ("[0, 1)", "the EMA decay (1 would keep the initial weights)"),
    "iterations": ("[1, inf)", "training steps; 0 only with --eval-only"),
    "max_wallclock_seconds": ("(-inf, inf)", "seconds (<= 0: no wallclock cap)"),
    "gptq_reserve_seconds": ("[0, inf)", "seconds kept from the cap for GPTQ"),
    "warmdown_frac": ("[0, 1]", "a fraction of the run"),
    "min_lr": ("[0, 1]", "a multiplier of the learning rate"),
    "enable_looping_at": ("(-inf, 1]", "a fraction of the run (< 0: never)"),
    "warmup_steps": ("[0, inf)", "priming steps per loop mode"),
    "train_batch_tokens": ("[1, inf)", "tokens per optimizer step"),
    "train_seq_len": ("[1, inf)", "tokens per training sequence"),
    "grad_accum_steps": ("[0, inf)", "micro-batches per step (0: 8 // world size)"),
    "val_loss_every": ("[0, inf)", "steps (0: at the end only)"),
    "train_log_every": ("[0, inf)", "steps"),
    "eval_seq_len": ("[1, inf)", "tokens per evaluation window"),
    "eval_stride": ("[1, inf)", "tokens between sliding windows"),
    "val_batch_seqs": ("[1, inf)", "windows per evaluation batch"),
    "val_max_tokens": ("[0, inf)", "validation tokens (0: all)"),
    "gptq_calibration_batches": ("[1, inf)", "batches"),
    "quant_passthrough_max_numel": ("[0, inf)", "elements"),
    "matrix_clip_sigmas": ("(0, inf)", "an SDClip k"),
    "embed_clip_sigmas": ("(0, inf)", "an SDClip k"),
    "ttt_lr": ("[0, inf)", "a learning rate"),
    "ttt_epochs": ("[0, inf)", "passes per chunk"),
    "ttt_chunk_tokens": ("[1, inf)", "tokens per TTT chunk"),
    "ttt_momentum": ("[0, 1)", "a momentum"),
    "ttt_grad_clip": ("(-inf, inf)", "a gradient norm"),
    "ttt_batch_seqs": ("[1, inf)", "sequences per TTT step"),
    "hash_embed_size": ("[1, inf)", "hash buckets"),
    "seed": ("[0, 9223372036854775807]", "a random seed"),
}
MODEL_RANGES: dict[str, tuple[str, str]] = {
    "vocab_size": ("[2, 65536]", "token ids (the shard format holds uint16)"),
    "num_layers": ("[1, inf)", "layers"),
    "model_dim": ("[1, inf)", "the width"),
    "num_heads": ("[1, inf)", "attention heads"),
    "num_kv_heads": ("[1, inf)", "key/value heads"),
    "mlp_mult": ("(0, inf)", "the MLP width multiplier"),
    "rope_dims": ("[2, inf)", "rotary dimensions per head"),
    "rope_base": ("(0, inf)", "the RoPE base"),
    "rope_train_seq_len": ("[1, inf)", "tokens"),
    "qk_gain_init": ("(-inf, inf)", "a gain"),
    "logit_softcap": ("(0, inf)", "the logit softcap"),
    "xsa_last_n": ("[0, inf)", "layers"),
    "loop_start": ("[0, inf)", "a layer index"),
    "loop_end": ("[0, inf)", "a layer index"),
    "num_loops": ("[0, inf)", "extra passes of the looped layers"),
    "parallel_start_layer": ("[0, inf)", "a layer index"),
    "tied_embed_init_std": ("[0, inf)", "a standard deviation"),
    "hash_embed_size": ("[1, inf)", "hash buckets"),
    "train_seq_len": ("[1, inf)", "tokens per training sequence"),
}


class ConfigError(ValueError):
    """A config value of the wrong type, out of its range or not one of its choices; the message names
    the environment variable, flag or file it came from."""


def _interval(spec: str) -> tuple[float, float, bool, bool]:
    # integer bounds stay exact ints: float(2**63 - 1) would admit a seed of 2**63
    lo, hi = (int(x) if x.strip().lstrip("-").isdigit() else float(x) for x in spec[1:-1].split(","))
    return lo, hi, spec[0] == "[", spec[-1] == "]"


def in_range(value, spec: str) -> bool:
    lo, hi, lo_closed, hi_closed = _interval(spec)
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (lo <= value if lo_closed else lo < value) and (value <= hi if hi_closed else value < hi)


def describe_range(spec: str) -> str:
    """'[1, inf)' -> '>= 1', '(0, inf)' -> '> 0', '[0, 1)' -> 'in [0, 1)', '(-inf, inf)' -> 'finite'."""
    lo, hi, lo_closed, _ = _interval(spec)
    if math.isinf(lo) and math.isinf(hi):
        return "a finite number"
    if math.isinf(hi):
        return f"{'>=' if lo_closed else '>'} {spec[1:-1].split(',')[0]}"
    return f"in {spec}"


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
            try:
                return int(text)  # exact: a float round trip would change a large seed silently
            except ValueError:
                pass
            try:
                value = float(text)  # "1e6" style, exact only below 2^53
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value != int(value) or abs(value) > 2**53:
                raise ValueError(f"expected an integer, e.g. {default} (1e3 style too)") from None
            return int(value)
        if isinstance(default, float):
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"expected a number, e.g. {default}") from None
    except ValueError as e:
        raise ConfigError(f"config {name}={raw!r}: {e}") from None
    return text


def model_fields() -> dict:
    """GPTConfig's fields and their defaults (each can be set by env NAME or --model-name)."""
    return {f.name: f.default for f in dataclasses.fields(GPTConfig)}


# Training fields that also exist in GPTConfig: the training value is used for both.
SHARED = ("train_seq_len", "hash_embed_size")


def resolve_config(
    preset: str,
    env: dict | None = None,
    cli: dict | None = None,
    cli_model: dict | None = None,
    *,
    base: Config | None = None,
    base_source: str | None = None,
    training: bool = True,
) -> Config:
    """preset (or ``base``, a saved run's config) -> environment variables (FIELD_NAME in upper case) ->
    CLI values. Returns a Config whose every field is of its type, one of its choices and in its range
    (``training``: iterations >= 1); else raises ConfigError naming where the bad value came from."""
    cfg, source = overridden_config(preset, env, cli, cli_model, base=base, base_source=base_source)
    _check(cfg, source, training)
    return cfg


def overridden_config(preset: str, env=None, cli=None, cli_model=None, *, base=None, base_source=None):
    """resolve_config's overrides without its range checks (the shipped program reads its config so; the
    checks are train.py's): (the Config, where each field's value came from)."""
    if base is None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        base, base_source = PRESETS[preset], f"preset {preset}"
    env = os.environ if env is None else env
    values = asdict(base)
    overrides = dict(base.model_overrides)
    source = dict.fromkeys([*values, *model_fields()], base_source or "the saved config")
    for f in dataclasses.fields(Config):
        if f.name == "model_overrides":
            continue
        if f.name.upper() in env:
            values[f.name] = _convert(f.name.upper(), env[f.name.upper()], getattr(base, f.name))
            source[f.name] = f"environment {f.name.upper()}"
    defaults = model_fields()
    for name, default in defaults.items():
        if name not in SHARED and name.upper() in env:
            overrides[name] = _convert(name.upper(), env[name.upper()], default)
            source[name] = f"environment {name.upper()}"
    for name, raw in (cli or {}).items():
        values[name] = _convert("--" + name.replace("_", "-"), raw, getattr(base, name))
        source[name] = "--" + name.replace("_", "-")
    for name, raw in (cli_model or {}).items():
        overrides[name] = _convert("--model-" + name.replace("_", "-"), raw, defaults[name])
        source[name] = "--model-" + name.replace("_", "-")
    values["model_overrides"] = overrides
    return Config(**values), source


def _check(cfg: Config, source: dict, training: bool) -> None:
    def refuse(name: str, value, why: str):
        raise ConfigError(f"config {name}={value!r} (from {source[name]}): {why}")

    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            refuse(name, getattr(cfg, name), f"expected one of {choices}")
    fields = [(n, getattr(cfg, n), RANGES) for n in RANGES]
    fields += [(n, v, MODEL_RANGES) for n, v in cfg.model_overrides.items() if n in MODEL_RANGES]
    for name, value, ranges in fields:
        spec, what = ranges[name]
        if name == "iterations" and not training:
            spec = "[0, inf)"
        if not in_range(value, spec):
            refuse(name, value, f"must be {describe_range(spec)} ({what})")
    if (cfg.sliding_window_enabled or cfg.ttt_enabled) and cfg.eval_stride > cfg.eval_seq_len:
        refuse("eval_stride", cfg.eval_stride, f"must be <= eval_seq_len {cfg.eval_seq_len}")
    if 0 < cfg.val_max_tokens <= cfg.eval_seq_len:
        refuse("val_max_tokens", cfg.val_max_tokens, f"must be 0 (all) or > eval_seq_len {cfg.eval_seq_len}")
    if cfg.max_wallclock_seconds > 0 and cfg.gptq_reserve_seconds >= cfg.max_wallclock_seconds:
        refuse(
            "gptq_reserve_seconds",
            cfg.gptq_reserve_seconds,
            f"leaves no training time of max_wallclock_seconds {cfg.max_wallclock_seconds}",
        )


# Environment variables of other tools (and of torchrun), never taken for a misspelt config field.
_FOREIGN_PREFIXES = (
    "OMP_", "MKL_", "CUDA", "NCCL_", "NVSHMEM_", "TORCH", "TRITON_", "PYTHON", "PYTEST", "HF_", "PIP_",
    "LC_", "XDG_", "SSH_", "CONDA", "VIRTUAL_ENV", "GOLFBENCH_", "MATCHED_FINEWEB_", "MASTER_", "LOCAL_",
    "GROUP_", "ROLE_", "NODE_",
)  # fmt: skip
_OWN = {"RUN_ID", "RANK", "WORLD_SIZE"}


def _looks_like(name: str, field_name: str) -> float:
    """How close an environment name is to a field's (0: not at all): close in spelling, sharing a word
    and nearly so, or made of the field's words (SEQ_LEN of TRAIN_SEQ_LEN)."""
    ratio = difflib.SequenceMatcher(None, name, field_name).ratio()
    words, field_words = set(name.split("_")), set(field_name.split("_"))
    return ratio if ratio >= 0.8 or (ratio >= 0.6 and words & field_words) or words <= field_words else 0.0


def unknown_env_warnings(env: dict | None = None) -> list[str]:
    """One warning per environment variable that looks like a config field but is none (SEQ_LEN=0 is
    silently not TRAIN_SEQ_LEN), naming the nearest fields."""
    env = os.environ if env is None else env
    fields = sorted(
        {n.upper() for n in asdict(Config()) if n != "model_overrides"} | {n.upper() for n in model_fields()}
    )
    warnings = []
    for name in sorted(env):
        if name in fields or name in _OWN or name.startswith(_FOREIGN_PREFIXES):
            continue
        if not re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", name):
            continue
        near = sorted((-_looks_like(name, f), f) for f in fields if _looks_like(name, f) > 0)
        if near:
            guess = " or ".join(f for _, f in near[:3])
            value = env[name]
            warnings.append(
                f"environment {name}={value!r} is not a config field (ignored); did you mean {guess}?"
            )
    return warnings


def model_config(cfg: Config, device: torch.device):
    """The GPTConfig of this run: preset + overrides, the training sequence length, and the kernels."""
    impl = cfg.kernels
    if impl == "auto" and device.type == "cpu":
        # "auto" would run the Triton kernels in the interpreter when TRITON_INTERPRET=1 (minutes a step).
        impl = "torch"
    overrides = dict(cfg.model_overrides)
    for name in KERNEL_IMPL_FIELDS:
        overrides.setdefault(name, impl)
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


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the message, and --help for the flags) instead of the usage of
    some 90 config flags first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (python {self.prog} --help lists every flag)\n")


def field_notes(cls) -> dict[str, str]:
    """Each field's trailing comment in the class's source (``name: type = default  # note``): what it
    documents there, for the flag's help; {} when the source cannot be read."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    notes = {}
    for line in lines:
        m = re.match(r"    (\w+): [^=#]+= [^#]*#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def flag_help(name: str, default, spec_what: tuple[str, str] | None, choices, note: str, env: str):
    """(metavar, one-line help) of a config flag, generated from the field: its type or choices, its
    range and description (RANGES / MODEL_RANGES), its comment in the dataclass, its record default."""
    if choices:
        metavar = "{" + ",".join(choices) + "}"
    elif isinstance(default, bool):
        metavar = "0|1"
    else:
        metavar = {int: "INT", float: "FLOAT"}.get(type(default), "TEXT")
    spec, what = spec_what or (None, None)
    switch = " (1: on, 0: off)" if isinstance(default, bool) else ""
    text = note or what or name.replace("_", " ") + switch
    if spec:
        text += f"; {describe_range(spec)}"
    shown = int(default) if isinstance(default, bool) else default
    return metavar, f"{text} (record: {shown}; env {env})".replace("%", "%%")  # argparse formats with %


# Choices of GPTConfig's string fields (GPTConfig checks them itself; here for the flags' help)
MODEL_CHOICES = {**dict.fromkeys(KERNEL_IMPL_FIELDS, IMPLS), "attn_impl": ATTN_IMPLS}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--<field> for every Config field and --model-<field> for every GPTConfig field, each with a metavar
    and a one-line help generated from the field (flag_help)."""
    group = p.add_argument_group("run config (model/run_config.py Config; env: the field in upper case)")
    notes = field_notes(Config)
    for f in dataclasses.fields(Config):
        if f.name != "model_overrides":
            name, default = f.name, getattr(PRESETS["record"], f.name)
            metavar, text = flag_help(
                name, default, RANGES.get(name), CHOICES.get(name), notes.get(name, ""), name.upper()
            )
            flag = "--" + name.replace("_", "-")
            group.add_argument(flag, dest="cfg_" + name, default=None, metavar=metavar, help=text)
    group = p.add_argument_group("model config (model/config.py GPTConfig; env: the field in upper case)")
    notes = field_notes(GPTConfig)
    for name, default in model_fields().items():
        if name not in SHARED:
            choices, note = MODEL_CHOICES.get(name), notes.get(name, "")
            metavar, text = flag_help(name, default, MODEL_RANGES.get(name), choices, note, name.upper())
            flag = "--model-" + name.replace("_", "-")
            group.add_argument(flag, dest="model_" + name, default=None, metavar=metavar, help=text)


def config_flags(args: argparse.Namespace) -> tuple[dict, dict]:
    """The config flags given on the command line: (Config values, GPTConfig values), as strings."""
    cli = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    cli_model = {k[6:]: v for k, v in vars(args).items() if k.startswith("model_") and v is not None}
    return cli, cli_model


def read_saved_json(
    path: Path,
    fix: str = "restore it from the run that wrote it, or move it away and pass the config as flags",
) -> dict:
    """A config.json or meta.json a run wrote, or a clear error naming the file and ``fix``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc}); {fix}") from exc
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: expected a JSON object with a 'config' entry, got {type(obj).__name__}")
    return obj


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
    preset: str,
    cli: dict,
    cli_model: dict,
    eval_only: Path | None,
    meta: dict | None,
    env: dict | None = None,
) -> Config:
    """The config of this run: for --eval-only, the evaluated artifact's (the config.json its run wrote
    beside it) or checkpoint's (its meta.json); else the preset. Environment variables and flags override
    it field by field. A bad value exits naming its variable, flag or file."""
    beside = eval_only.parent / "config.json" if eval_only and eval_only.is_file() else None
    base, where = None, None
    if beside and beside.is_file():
        base, where = config_from(read_saved_json(beside), beside), beside
    elif eval_only and meta is not None:
        base, where = config_from(meta, eval_only / "meta.json"), eval_only / "meta.json"
    try:
        return resolve_config(
            preset, env, cli, cli_model, base=base, base_source=str(where), training=eval_only is None
        )
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def run_preset(preset: str, eval_only: Path | None, meta: dict | None) -> str:
    """The preset a run stands for, in its folder name and report: --preset for a new run; for --eval-only
    or --resume, that of the run that made what is evaluated or resumed (the "preset" of the config.json
    beside an artifact, else the preset of its model), not --preset's default."""
    beside = eval_only.parent / "config.json" if eval_only and eval_only.is_file() else None
    if beside and beside.is_file():
        saved = read_saved_json(beside)
    elif meta is not None:
        saved = meta
    else:
        return preset
    return str(saved.get("preset") or (saved.get("config") or {}).get("model_preset") or preset)
