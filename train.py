"""Train, quantise and evaluate the Parameter Golf record model (PR #1523) in one run.

    python train.py --preset tiny --device cpu         # whole pipeline, ~15 s on 2 CPU cores
    python train.py                                    # record config, one GPU (grad accumulation 8)
    torchrun --standalone --nproc_per_node=8 train.py  # the record: 8 GPUs, grad accumulation 1
    SEED=42 TTT_ENABLED=1 HASH_EMBED_ENABLED=1 TTT_LR=0.01 MUON_MOMENTUM=0.97 \\
        torchrun --standalone --nproc_per_node=8 train.py    # the seed's command line works as is
    python train.py --data data                        # FineWeb sp8192 (python -m model.data download)
    python train.py --eval-only runs/<run id>/final_model.ptz   # evaluate an artifact (or a checkpoint dir)
    python train.py --save-every 500                   # checkpoints in runs/<run id>/ckpt/step_NNNNNN/
    python train.py --resume runs/<run id>/ckpt/step_001000     # continue (the run is marked non-record)

Every run writes runs/<run id>/: train.log (environment header, config, metric lines), metrics.jsonl
(one line per step and per validation), config.json, report.json (val loss/bpb per phase, artifact
bytes, times, throughput, a compliance block), submission.json (the challenge's format), loss.png and
throughput.png, and final_model.ptz (the artifact).

--eval-only with an artifact uses the config.json its run wrote beside it (unless CLI flags are given).

Configuration: the `Config` dataclass below holds the #1523 hyperparameters (SPEC.md Appendix A); a
preset (`record`, `tiny`) is overridden by environment variables named like the fields in upper case
(SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS, TTT_ENABLED, MUON_MOMENTUM, ...; GPTConfig fields too, e.g.
QK_GAIN_INIT), then by CLI flags (--matrix-lr 0.03, --model-num-layers 9). The resolved config is logged.

Pipeline (SPEC §5, Appendix B): untimed priming (compile both loop modes, then restore weights and every
optimizer state exactly) -> timed loop (wallclock cap minus the GPTQ reserve, LR warmdown and recurrence
by fraction of the cap, Muon momentum warmup, grad clip, EMA, a non-finite guard before every optimizer
step) -> EMA weights -> pre-quant eval -> GPTQ artifact -> dequantised eval -> sliding-window eval ->
score-first TTT (with the hash embedding).

Data layout across processes: micro-batch j of rank r reads the loader of "data rank" r * accum + j of
world * accum. The token stream thus depends only on world * accum (8 for the record), not on how it is
split: one GPU with accumulation 8 sees exactly the batches of 8 GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent
CAP_TRAIN_S = 600.0  # challenge limits (SPEC §8.5, §7.5)
CAP_EVAL_S = 600.0
# Dense bf16 tensor-core peak by GPU name (FLOP/s), for MFU. H100/H200 SXM: 989 TFLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
FAULT_ENV = "GOLFBENCH_FAULT_NAN"  # test hook: "STEP" or "STEP:RANK" poisons that step's loss with NaN
FAULT_EXIT_ENV = "GOLFBENCH_FAULT_EXIT"  # test hook: "STEP" or "STEP:RANK": that rank exits (1) at that step


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # model (model/config.py presets; GPTConfig fields are overridden through model_overrides)
    model_preset: str = "record"
    model_overrides: dict = field(default_factory=dict)
    embed_dtype: str = "bfloat16"  # the tied embedding's master dtype; it sets the activation dtype
    kernels: str = "auto"  # fused MLP / softcapped CE / attention: auto | triton | torch (reference)
    muon_impl: str = "banked"  # banked (ours) | per_matrix (one Muon per 2-D matrix: the reference)
    compile: str = "auto"  # torch.compile the model: auto (on CUDA) | on | off
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

_CHOICES = {
    "embed_dtype": ("bfloat16", "float32"),
    "kernels": ("auto", "triton", "torch"),
    "muon_impl": ("banked", "per_matrix"),
    "compile": ("auto", "on", "off"),
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


def _model_fields() -> dict:
    from model.config import GPTConfig

    return {f.name: f.default for f in dataclasses.fields(GPTConfig)}


# Training fields that also exist in GPTConfig: the training value is used for both.
_SHARED = ("train_seq_len", "hash_embed_size")


def resolve_config(
    preset: str, env: dict | None = None, cli: dict | None = None, cli_model: dict | None = None
):
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
    for name, default in _model_fields().items():
        if name not in _SHARED and name.upper() in env:
            overrides[name] = _convert(name.upper(), env[name.upper()], default)
    for name, raw in (cli or {}).items():
        values[name] = _convert("--" + name.replace("_", "-"), raw, getattr(base, name))
    defaults = _model_fields()
    for name, raw in (cli_model or {}).items():
        overrides[name] = _convert("--model-" + name.replace("_", "-"), raw, defaults[name])
    values["model_overrides"] = overrides
    cfg = Config(**values)
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"config {name}={getattr(cfg, name)!r}: expected one of {choices}")
    return cfg


def model_config(cfg: Config, device: torch.device):
    """The GPTConfig of this run: preset + overrides, the training sequence length, and the kernels."""
    from model import get_config

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


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()


def code_hash() -> str:
    """sha256 over the shipped source files (the ones counted in the artifact's code bytes)."""
    from model.quant import shipped_files

    h = hashlib.sha256()
    for rel in shipped_files(ROOT):
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Processes, logging
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


def setup_processes(device_arg: str) -> Dist:
    """One process, or torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU."""
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu for a smoke run)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world:
        raise SystemExit(f"WORLD_SIZE={world} must divide 8 (the record's 8 micro-batches per step)")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=device if want_cuda else None)
    return Dist(rank, world, local_rank, device)


class Logger:
    """Rank 0 prints and appends to train.log; every rank can append to metrics.jsonl through rank 0."""

    def __init__(self, run_dir: Path | None, main: bool):
        self.main = main
        self.log_path = run_dir / "train.log" if run_dir and main else None
        self.metrics_path = run_dir / "metrics.jsonl" if run_dir and main else None
        self.records: list[dict] = []

    def __call__(self, msg: str = "") -> None:
        if not self.main:
            return
        print(msg, flush=True)
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    def metric(self, record: dict) -> None:
        if not self.main:
            return
        self.records.append(record)
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(pd: Dist) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # GOLFBENCH_GIT_SHA names the commit where the tree was copied without (or with a stale) .git
    sha = os.environ.get("GOLFBENCH_GIT_SHA") or _git("rev-parse", "HEAD")
    dirty = (
        None if os.environ.get("GOLFBENCH_GIT_SHA") else _git("status", "--porcelain", "--untracked-files=no")
    )
    gpu = torch.cuda.get_device_name(pd.device) if pd.device.type == "cuda" else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "device": str(pd.device),
        "world_size": pd.world,
        "cpu_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "git_sha": sha,
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


def peak_flops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)


def _write_json(path: Path, obj) -> None:
    from model.data import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    paths: object  # model.data.DataPaths
    val_tokens: torch.Tensor
    byte_counter: object
    fingerprint: str | None
    val_sha256: str


def load_data(cfg: Config, data_dir: str | None, vocab_size: int, pd: Dist, log: Logger) -> Data:
    import sentencepiece as spm

    from model.data import ensure_default_corpus, fineweb_paths, load_val_tokens
    from model.metrics import ByteCounter

    if data_dir:
        paths = fineweb_paths(data_dir, f"sp{vocab_size}")
    else:
        # Every rank calls it: the builder holds a file lock, so the corpus is built once.
        paths = ensure_default_corpus(vocab_size, progress=pd.main)
    if paths.vocab_size > vocab_size:
        raise SystemExit(
            f"the tokenizer {paths.tokenizer_model} has {paths.vocab_size} pieces but the model's vocab_size "
            f"is {vocab_size}: use matching data (--data) or --model-vocab-size {paths.vocab_size}"
        )
    val = load_val_tokens(paths.val_pattern, cfg.eval_seq_len)
    if cfg.val_max_tokens > 0 and val.numel() - 1 > cfg.val_max_tokens:
        usable = (cfg.val_max_tokens // cfg.eval_seq_len) * cfg.eval_seq_len
        val = val[: usable + 1].clone()
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer_model))
    sha = hashlib.sha256(val.numpy().tobytes()).hexdigest()
    log(f"data: {paths.source} {paths.dataset_dir} | val tokens {val.numel() - 1:,} | val sha256 {sha[:16]}")
    return Data(paths, val, ByteCounter(sp, vocab_size=vocab_size), paths.fingerprint, sha)


class Batches:
    """This rank's micro-batches: micro-batch j reads data rank (rank * accum + j) of (world * accum)."""

    def __init__(self, cfg: Config, paths, pd: Dist, accum: int, micro_seqs: int):
        from model.data import ShuffledSequenceLoader

        self.micro_seqs = micro_seqs
        self.loaders = [
            ShuffledSequenceLoader(
                paths.train_pattern,
                cfg.train_seq_len,
                seed=cfg.seed,
                rank=pd.rank * accum + j,
                world_size=pd.world * accum,
            )
            for j in range(accum)
        ]

    def next(self, j: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loaders[j].next_batch(self.micro_seqs)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    def state_dict(self) -> list[dict]:
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.loaders):
            raise ValueError(f"checkpoint has {len(states)} loader states, this run has {len(self.loaders)}")
        for loader, state in zip(self.loaders, states):
            loader.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Model and optimizers
# ---------------------------------------------------------------------------------------------------------


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


def build_model(cfg: Config, device: torch.device, pd: Dist | None = None):
    """GPT in the record's training dtypes (bf16 embedding master, fp32 banks/scalars), same on all ranks."""
    from model import GPT

    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, device)).to(device)
    model.to_training_dtypes(getattr(torch, cfg.embed_dtype))
    if pd is not None and pd.on:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, 0)
    return model


class PerMatrixMuon:
    """The reference Muon layout (#1493): one optim.Muon per 2-D matrix of the banks, eager, so each of
    the 66 matrices gets its own momentum, row-norm and Newton-Schulz kernels in a Python loop. The
    matrices are Parameters that alias the bank slices; their gradients are views of the bank gradients."""

    def __init__(self, banks, **kw):
        from optim import Muon

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("muon_impl=per_matrix is the single-process reference; use banked with torchrun")
        self.slices = [
            (bank, i, torch.nn.Parameter(bank.data[i])) for bank in banks for i in range(bank.size(0))
        ]
        self.opts = [Muon([p], cuda_graph=False, **kw) for _, _, p in self.slices]
        self.param_groups = [g for opt in self.opts for g in opt.param_groups]

    def launch_reduce_scatters(self) -> None:
        pass

    @torch.no_grad()
    def step(self) -> None:
        for (bank, i, p), opt in zip(self.slices, self.opts):
            if bank.grad is None:
                continue
            p.grad = bank.grad[i]
            opt.step()
            p.grad = None

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.opts]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, s in zip(self.opts, states):
            opt.load_state_dict(s)


class Optimizers:
    """Muon on the banks, AdamW on the tied embedding and on the scalars (SPEC §5.1), stepped in the
    #1523 order: bank reduce-scatters launched, replicated grads averaged (one collective per dtype),
    AdamW steps overlapping the reduce-scatters, then Muon (Appendix B steps 4-6)."""

    def __init__(self, model, cfg: Config, device: torch.device):
        from optim import Muon

        groups = model.param_groups()
        muon_kw = dict(
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_wd,
            ns_steps=cfg.muon_backend_steps,
            row_normalize=cfg.muon_row_normalize,
        )
        if cfg.muon_impl == "per_matrix":
            self.muon = PerMatrixMuon(groups["matrix"], **muon_kw)
        else:
            self.muon = Muon(groups["matrix"], cuda_graph=device.type == "cuda", **muon_kw)
        adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda")
        self.embed = torch.optim.AdamW(
            groups["embed"], lr=cfg.tied_embed_lr, weight_decay=cfg.embed_wd, **adam
        )
        self.scalar = torch.optim.AdamW(groups["scalar"], lr=cfg.scalar_lr, weight_decay=cfg.adam_wd, **adam)
        self.named = {"muon": self.muon, "embed": self.embed, "scalar": self.scalar}
        for opt in self.named.values():
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        self.banks = groups["matrix"]
        self.replicated = groups["embed"] + groups["scalar"]
        self.params = self.banks + self.replicated

    def set_schedule(self, lr_mul: float, momentum: float) -> None:
        for opt in self.named.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mul
        for g in self.muon.param_groups:
            g["momentum"] = momentum

    def step(self) -> None:
        from optim import average_gradients

        self.muon.launch_reduce_scatters()
        if dist.is_available() and dist.is_initialized():
            for p in self.replicated:
                if p.grad is None:  # every rank must contribute every tensor to the collective
                    p.grad = torch.zeros_like(p)
        average_gradients([p.grad for p in self.replicated if p.grad is not None])
        self.embed.step()
        self.scalar.step()
        self.muon.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        # Bank gradients are zeroed in place, not freed: Muon replays CUDA graphs keyed by their
        # addresses, and backward accumulates into an existing gradient without moving it.
        for p in self.banks:
            if p.grad is not None:
                p.grad.zero_()
        for p in self.replicated:
            p.grad = None

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.named.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.named.items():
            opt.load_state_dict(state[name])


def compile_model(model, cfg: Config, device: torch.device):
    on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    if not on:
        return model
    torch._dynamo.config.cache_size_limit = max(16, torch._dynamo.config.cache_size_limit)
    return torch.compile(model, fullgraph=True, dynamic=False)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _fault_step(rank: int, env: str = FAULT_ENV) -> int | None:
    spec = os.environ.get(env)
    if not spec:
        return None
    step, _, at_rank = spec.partition(":")
    return int(step) if not at_rank or int(at_rank) == rank else None


def forward_backward(model_c, batches: Batches, accum: int, device, poison: bool = False) -> torch.Tensor:
    """Gradients of the mean loss over this rank's accum micro-batches; returns that mean loss (detached)."""
    total = torch.zeros((), device=device, dtype=torch.float32)
    for j in range(accum):
        x, y = batches.next(j, device)
        with autocast(device):
            loss = model_c(x, y)
        if poison and j == 0:
            loss = loss * float("nan")
        (loss / accum).backward()
        total += loss.detach().float()
    return total / accum


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Clip the local gradient (per rank, SPEC §5.6) and return its norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


class NonFiniteError(RuntimeError):
    pass


def check_finite(loss, norm, step: int | str, pd: Dist, log: Logger):
    """Stop before the optimizer step when any rank's loss or gradient is non-finite. One collective
    (flags of every rank + the loss and norm sums) and one host sync per step.
    Returns the rank-mean loss and gradient norm."""
    vec = torch.zeros(pd.world + 2, device=loss.device, dtype=torch.float64)
    vec[pd.rank] = (~(torch.isfinite(loss) & torch.isfinite(norm))).double()
    vec[pd.world] = loss.double()
    vec[pd.world + 1] = norm.double()
    if pd.on:
        dist.all_reduce(vec)
    values = vec.tolist()
    bad = [r for r in range(pd.world) if values[r] != 0]
    if bad:
        where = f"step {step}" if isinstance(step, int) else step
        msg = (
            f"non-finite loss or gradient at {where} on rank(s) {bad} (rank {pd.rank}: loss "
            f"{loss.item():.4g}, grad_norm {norm.item():.4g}); stopped before the optimizer step. Nothing of "
            "this step was applied or written; the last checkpoint (if any) is intact."
        )
        log(f"ERROR: {msg}")
        raise NonFiniteError(msg)
    return values[pd.world] / pd.world, values[pd.world + 1] / pd.world


# ---------------------------------------------------------------------------------------------------------
# Schedule, EMA
# ---------------------------------------------------------------------------------------------------------


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """1 until 1 - warmdown_frac of the run, then linear to min_lr at the end (SPEC §5.4)."""
    if warmdown_frac <= 0 or frac < 1 - warmdown_frac:
        return 1.0
    return max((1 - frac) / warmdown_frac, min_lr)


def muon_momentum(cfg: Config, step: int) -> float:
    r = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - r) * cfg.muon_momentum_warmup_start + r * cfg.muon_momentum


def train_budget_s(cfg: Config) -> float:
    return cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds if cfg.max_wallclock_seconds > 0 else 0.0


def progress(cfg: Config, step: int, elapsed_s: float) -> float:
    """Fraction of the run done: of the wallclock budget, or of the iterations, whichever bound is nearer."""
    frac = step / cfg.iterations if cfg.iterations > 0 else 0.0
    budget = train_budget_s(cfg)
    return max(frac, elapsed_s / budget) if budget > 0 else frac


class EMA:
    """fp32 exponential moving average of every state-dict tensor (SPEC §5.5), no bias correction."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.sources = model.state_dict()
        self.shadow = {k: v.detach().float().clone() for k, v in self.sources.items()}

    @torch.no_grad()
    def update(self) -> None:
        keys = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[k] for k in keys], [self.sources[k].float() for k in keys], 1 - self.decay
        )

    def copy_to(self, model) -> None:
        model.load_state_dict(self.shadow)  # load_state_dict casts to each tensor's dtype

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def _save_torch(obj, path: Path) -> None:
    from model.data import atomic_write

    with atomic_write(path) as f:
        torch.save(obj, f)


def save_checkpoint(run, step: int, elapsed_s: float) -> Path:
    """ckpt/step_NNNNNN/rank{r}.pt (each written to a temporary name and renamed), then meta.json from
    rank 0 once all ranks are done: a directory without meta.json is incomplete and is never resumed."""
    pd = run.pd
    ckdir = run.run_dir_shared / "ckpt" / f"step_{step:06d}"
    payload = {"optimizers": run.opts.state_dict(), "loaders": run.batches.state_dict(), "rank": pd.rank}
    if pd.main:
        payload.update(
            model=run.model.state_dict(), ema=run.ema.state_dict(), looping=bool(run.model.looping)
        )
    _save_torch(payload, ckdir / f"rank{pd.rank}.pt")
    pd.barrier()
    if pd.main:
        meta = {
            "step": step,
            "elapsed_s": elapsed_s,
            "world_size": pd.world,
            "grad_accum_steps": run.accum,
            "config": asdict(run.cfg),
            "config_hash": config_hash(run.cfg),
            "code_hash": run.code_hash,
            "run_id": run.run_id,
            "record_eligible": not run.non_record,
        }
        _write_json(ckdir / "meta.json", meta)
        run.log(f"checkpoint: {ckdir}")
    pd.barrier()
    return ckdir


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


def config_from(saved: dict, where: Path) -> Config:
    """The Config a run saved (config.json or checkpoint meta), or a clear error naming the file."""
    try:
        return Config(**saved["config"])
    except (KeyError, TypeError) as exc:
        raise SystemExit(
            f"{where}: its config does not match this train.py ({type(exc).__name__}: {exc}); "
            "evaluate it with the code version that wrote it, or pass the config as flags"
        ) from exc


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


def load_checkpoint(run, path: Path) -> dict:
    payload = torch.load(path / f"rank{run.pd.rank}.pt", map_location=run.device, weights_only=False)
    if run.pd.main:
        run.model.load_state_dict(payload["model"])
        run.ema.load_state_dict(payload["ema"])
        looping = payload["looping"]
    else:
        looping = False
    if run.pd.on:  # weights and EMA live in rank 0's file
        with torch.no_grad():
            for t in list(run.model.state_dict().values()) + list(run.ema.shadow.values()):
                dist.broadcast(t, 0)
        flag = torch.tensor([float(looping)], device=run.device)
        dist.broadcast(flag, 0)
        looping = bool(flag.item())
    run.model.set_looping(looping)
    run.opts.load_state_dict(payload["optimizers"])
    return payload


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


class Run:
    """Everything one training process holds."""

    def __init__(self, cfg: Config, pd: Dist, run_id: str, run_dir: Path, log: Logger, data: Data):
        self.cfg, self.pd, self.device, self.run_id, self.log, self.data = (
            cfg,
            pd,
            pd.device,
            run_id,
            log,
            data,
        )
        self.run_dir_shared = run_dir
        self.accum, self.micro_seqs = batch_layout(cfg, pd.world)
        self.model = build_model(cfg, self.device, pd)
        self.model_c = compile_model(self.model, cfg, self.device)
        self.opts = Optimizers(self.model, cfg, self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.batches = self.new_batches()
        self.code_hash = code_hash()
        self.non_record: list[str] = []

    def new_batches(self) -> Batches:
        return Batches(self.cfg, self.data.paths, self.pd, self.accum, self.micro_seqs)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, step: int | str, lr_mul: float, momentum: float, poison: bool = False):
        """One optimizer step (Appendix B): micro-batches, clip, guard, optimizers. Returns (loss, norm)."""
        self.opts.set_schedule(lr_mul, momentum)
        loss = forward_backward(self.model_c, self.batches, self.accum, self.device, poison)
        norm = clip_gradients(self.opts.params, self.cfg.grad_clip_norm)
        loss, norm = check_finite(loss, norm, step, self.pd, self.log)
        self.opts.step()
        return loss, norm

    def prime(self) -> float:
        """Run warmup_steps real steps per loop mode (compiles both graphs and the optimizer paths), then
        restore the weights and every optimizer state and check that they are exactly restored."""
        cfg = self.cfg
        if cfg.warmup_steps <= 0:
            return 0.0
        t0 = time.perf_counter()
        model_snap = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_snap = _clone_state(self.opts.state_dict())
        was_looping = bool(self.model.looping)
        modes = [False, True] if self.model.config.num_loops > 0 else [False]
        for looping in modes:
            self.model.set_looping(looping)
            for i in range(cfg.warmup_steps):
                self.step(f"priming step {i + 1} (looping {int(looping)})", 1.0, muon_momentum(cfg, 0))
        self.model.set_looping(was_looping)
        self.model.load_state_dict(model_snap)
        self.opts.load_state_dict(opt_snap)
        _assert_restored(self.model, model_snap, self.opts.state_dict(), opt_snap)
        self.batches = self.new_batches()
        self.sync()
        seconds = time.perf_counter() - t0
        self.log(
            f"priming: {cfg.warmup_steps} steps x {len(modes)} loop mode(s) in {seconds:.1f} s; weights and "
            "optimizer state (Muon momentum included) restored exactly"
        )
        return seconds

    def validate(self, step: int) -> dict:
        from model.evaluate import eval_non_overlapping

        r = eval_non_overlapping(
            self.model,
            self.data.val_tokens,
            seq_len=self.cfg.eval_seq_len,
            batch_seqs=self.cfg.val_batch_seqs,
            byte_counter=self.data.byte_counter,
            device=self.device,
        )
        self.log(
            f"step {step} | val_loss {r['val_loss']:.4f} | val_bpb {r['val_bpb']:.4f} | "
            f"looping {int(self.model.looping)} | {r['seconds']:.1f} s"
        )
        self.log.metric({"kind": "val", "step": step, "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]})
        return r

    def train(self, start_step: int = 0, elapsed_s: float = 0.0, save_every: int = 0) -> dict:
        cfg, pd, log = self.cfg, self.pd, self.log
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        peak = peak_flops(gpu)
        budget = train_budget_s(cfg)
        fault, exit_at = _fault_step(pd.rank), _fault_step(pd.rank, FAULT_EXIT_ENV)
        can_loop = self.model.config.num_loops > 0 and cfg.enable_looping_at >= 0
        step, stop_after, last_val = start_step, None, None
        start_elapsed = elapsed_s
        window = dict(t=elapsed_s, tokens=0, flops=0.0, steps=0)
        total_tokens = 0
        first_loss = last_loss = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0 = time.perf_counter()
        while True:
            last = step >= cfg.iterations or (stop_after is not None and step >= stop_after)
            periodic = cfg.val_loss_every > 0 and step > start_step and step % cfg.val_loss_every == 0
            saving = save_every > 0 and step > start_step and (step % save_every == 0 or last)
            if last or periodic or saving:  # outside the training clock
                self.sync()
                elapsed_s += time.perf_counter() - t0
                if (last or periodic) and last_val != step:
                    self.validate(step)
                    last_val = step
                if saving:
                    save_checkpoint(self, step, elapsed_s)
                self.sync()
                t0 = time.perf_counter()
            if last:
                break
            now_s = elapsed_s + time.perf_counter() - t0
            frac = progress(cfg, step, now_s)
            if can_loop and not self.model.looping and frac >= cfg.enable_looping_at:
                self.model.set_looping(True)
                log(f"step {step} | looping on (frac {frac:.3f})")
            lr_mul, mu = lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr), muon_momentum(cfg, step)
            if exit_at == step + 1:  # the test hook: die as a crashed rank would, nothing cleaned up
                msg = f"rank {pd.rank}: {FAULT_EXIT_ENV} at step {step + 1}, time {time.time():.3f}"
                print(msg, file=sys.stderr, flush=True)
                os._exit(1)
            loss, norm = self.step(step + 1, lr_mul, mu, poison=fault == step + 1)
            self.ema.update()
            step += 1
            total_tokens += cfg.train_batch_tokens
            window["tokens"] += cfg.train_batch_tokens
            window["flops"] += self.model.flops_per_token(bool(self.model.looping)) * cfg.train_batch_tokens
            window["steps"] += 1
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            now_s = elapsed_s + time.perf_counter() - t0
            if budget > 0 and stop_after is None:
                reached = now_s >= budget
                if pd.on:  # all ranks stop after the same step
                    flag = torch.tensor([float(reached)], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    reached = bool(flag.item())
                if reached:
                    stop_after = step
                    log(f"step {step} | wallclock budget {budget:.0f} s reached at {now_s:.1f} s")
            rec = {
                "step": step,
                "loss": loss,
                "grad_norm": norm,
                "lr_mul": lr_mul,
                "momentum": mu,
                "looping": bool(self.model.looping),
                "train_s": now_s,
            }
            if step % max(cfg.train_log_every, 1) == 0 or step in (1, cfg.iterations, stop_after):
                dt = max(now_s - window["t"], 1e-9)
                tok_s = window["tokens"] / dt
                tflops = window["flops"] / dt / 1e12
                rec.update(
                    tok_s=tok_s, tok_s_avg=total_tokens / max(now_s - start_elapsed, 1e-9), tflops=tflops
                )
                parts = [
                    f"step {step}/{cfg.iterations}",
                    f"loss {loss:.4f}",
                    f"grad_norm {norm:.3f}",
                    f"lr {lr_mul:.3f}",
                ]
                if self.device.type == "cuda":
                    mem = torch.cuda.max_memory_allocated(self.device) / 2**30
                    rec["mem_gib"] = mem
                    parts.append(f"mem {mem:.1f} GiB")
                parts += [f"tok/s {tok_s:,.0f}", f"TFLOP/s {tflops:.3g}"]
                if peak:
                    rec["mfu"] = tflops * 1e12 / (peak * pd.world)
                    parts.append(f"MFU {100 * rec['mfu']:.1f}%")
                parts.append(f"{1000 * dt / window['steps']:.0f} ms/step")
                parts.append(f"train {now_s:.1f} s")
                log(" | ".join(parts))
                window = dict(t=now_s, tokens=0, flops=0.0, steps=0)
            log.metric(rec)
        steps_run = step - start_step
        return {
            "steps": step,
            "steps_this_run": steps_run,
            "train_seconds": elapsed_s,
            "train_tokens": total_tokens,
            "tokens_per_s": total_tokens / max(elapsed_s - start_elapsed, 1e-9) if steps_run else None,
            "loss_first": first_loss,
            "loss_last": last_loss,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda"
            else None,
            "peak_rss_bytes": _peak_rss(),
            "looping_final": bool(self.model.looping),
        }


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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
# After training: artifact and evaluation phases
# ---------------------------------------------------------------------------------------------------------


def _phase_result(r: dict) -> dict:
    keep = (
        "val_loss",
        "val_bpb",
        "tokens",
        "bytes",
        "seconds",
        "windows",
        "n_chunks",
        "train_steps",
        "score_s",
        "train_s",
    )
    return {k: r[k] for k in keep if k in r}


def build_artifact(model, cfg: Config, data: Data, pd: Dist, device, path: Path, log: Logger) -> dict:
    """GPTQ Hessians from the first calibration batches of this rank's training stream (rank 0 only: the
    artifact comes from rank 0), quantise, compress, write atomically; every rank then waits for it."""
    from model.data import ShuffledSequenceLoader
    from model.quant import CAP_BYTES, code_size, collect_hessians, save_artifact, size_report

    t0 = time.perf_counter()
    info = None
    if pd.main:
        accum, micro = batch_layout(cfg, pd.world)  # data rank 0 = rank 0's first micro-batch stream
        loader = ShuffledSequenceLoader(
            data.paths.train_pattern, cfg.train_seq_len, seed=cfg.seed, rank=0, world_size=pd.world * accum
        )
        batches = (loader.next_batch(micro)[0] for _ in range(cfg.gptq_calibration_batches))
        hessians = collect_hessians(model, batches)
        t1 = time.perf_counter()
        code = code_size(ROOT)
        info = save_artifact(
            model,
            hessians,
            path,
            passthrough_max_numel=cfg.quant_passthrough_max_numel,
            matrix_clip_sigmas=cfg.matrix_clip_sigmas,
            embed_clip_sigmas=cfg.embed_clip_sigmas,
            max_model_bytes=CAP_BYTES - code["code_bytes"] if cfg.fit_artifact_to_cap else None,
        )
        info["hessian_s"] = t1 - t0
    pd.barrier()
    if pd.main:
        size = size_report(code["code_bytes"], info["model_bytes"])
        info.update(size=size, code=code)
        info["seconds"] = time.perf_counter() - t0
        k0, k = cfg.matrix_clip_sigmas, info["matrix_clip_sigmas"]
        refit = f" | int6 k raised {k0} -> {k:.4f} to fit" if k != k0 else ""
        log(
            f"artifact: {path.name} | model {size['model_bytes']:,} B + code {size['code_bytes']:,} B = "
            f"{size['artifact_bytes']:,} B ({size['status']} vs cap {size['cap_bytes']:,}) | "
            f"{info['n_quantized']} GPTQ + {info['n_passthrough']} passthrough tensors{refit} | "
            f"{info['quantize_s']:.1f} s GPTQ in {info['fit_attempts']} pass(es) | {info['seconds']:.1f} s"
        )
    return info


def evaluate_artifact(model, cfg: Config, data: Data, device, path: Path, log: Logger) -> dict:
    """Dequantised non-overlapping eval, sliding-window eval, then score-first TTT, each on a freshly
    loaded copy of the artifact, each timed."""
    from model.evaluate import eval_sliding_window, ttt_score_first
    from model.quant import load_artifact

    common = dict(seq_len=cfg.eval_seq_len, byte_counter=data.byte_counter, device=device)
    load_artifact(model, path)
    phases = {"quantized": non_overlapping_eval(model, cfg, data, device, log, "quantized")}
    if cfg.sliding_window_enabled:
        r = eval_sliding_window(
            model, data.val_tokens, stride=cfg.eval_stride, batch_windows=cfg.val_batch_seqs, **common
        )
        phases["sliding"] = _log_phase("sliding", r, log)
    if cfg.ttt_enabled:
        load_artifact(model, path)
        r = ttt_score_first(
            model,
            data.val_tokens,
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
            **common,
        )
        phases["ttt"] = _log_phase("ttt", r, log)
    return phases


def _log_phase(name: str, r: dict, log: Logger) -> dict:
    out = _phase_result(r)
    log(f"{name}: val_loss {r['val_loss']:.5f} | val_bpb {r['val_bpb']:.5f} | {r['seconds']:.1f} s")
    log.metric({"kind": "phase", "phase": name, **out})
    return out


def non_overlapping_eval(model, cfg: Config, data: Data, device, log: Logger, phase: str) -> dict:
    """The record's non-overlapping eval of the looped model (SPEC §8.1), logged as `phase`."""
    from model.evaluate import eval_non_overlapping

    model.set_looping(True)  # every eval runs the looped model
    r = eval_non_overlapping(
        model,
        data.val_tokens,
        seq_len=cfg.eval_seq_len,
        batch_seqs=cfg.val_batch_seqs,
        byte_counter=data.byte_counter,
        device=device,
    )
    return _log_phase(phase, r, log)


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _check(value, limit, unit: str, what: str) -> dict:
    if value is None:
        return {"status": "N/A", "what": what}
    return {
        "status": "PASS" if value <= limit else "FAIL",
        "value": value,
        "limit": limit,
        "unit": unit,
        "what": what,
    }


def compliance(report: dict, cfg: Config, data: Data) -> dict:
    phases = report.get("phases", {})
    train = report.get("train_seconds")
    artifact_s = phases.get("artifact", {}).get("seconds")
    train_total = train + (artifact_s or 0.0) if train is not None else None
    eval_s = sum(phases[p]["seconds"] for p in ("quantized", "sliding", "ttt") if p in phases) or None
    size = report.get("artifact_bytes") or {}
    block = {
        "train_time": _check(
            train_total, CAP_TRAIN_S, "s", "timed training loop + GPTQ/artifact (priming excluded)"
        ),
        "eval_time": _check(eval_s, CAP_EVAL_S, "s", "dequantised + sliding-window + TTT evaluation"),
        "artifact_size": _check(
            size.get("total"), size.get("cap", 16_000_000), "B", "code bytes + compressed model"
        ),
    }
    ttt = phases.get("ttt")
    total = data.val_tokens.numel() - 1
    if ttt is None:
        block["score_first_ttt"] = {"status": "N/A", "what": "TTT disabled"}
    else:
        ok = ttt["tokens"] == total
        block["score_first_ttt"] = {
            "status": "PASS" if ok else "FAIL",
            "value": ttt["tokens"],
            "expected": total,
            "what": "model.evaluate.ttt_score_first scores each chunk under no_grad before adapting on it; "
            "every validation token scored exactly once",
        }
    statuses = [v["status"] for v in block.values()]
    block["all_pass"] = all(s in ("PASS", "N/A") for s in statuses)
    return block


def write_submission(run_dir: Path, report: dict, cfg: Config, env: dict) -> None:
    final = report.get("final") or {}
    size = report.get("artifact_bytes") or {}
    gpu = env.get("gpu")
    sub = {
        "author": "golfbench",
        "github_id": "golfbench",
        "name": f"golfbench rebuild of PR #1523 ({cfg.model_preset} preset)",
        "blurb": "SP8192 + triple depth recurrence + parameter banking + fused MLP + Muon 0.97 + parallel "
        "residuals + score-first TTT with eval-time hash embedding + SDClip GPTQ int6 + Brotli "
        "(golfbench train.py)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "track": "10min_16mb",
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "bytes_total": size.get("total"),
        "bytes_code": size.get("code"),
        "seeds": [cfg.seed],
        "seed_results": {str(cfg.seed): {"val_bpb": final.get("val_bpb")}},
        "hardware": f"{env.get('world_size')}x{gpu}" if gpu else f"{env.get('world_size')}x CPU",
        "pytorch_version": env.get("torch"),
        "record_eligible": report.get("record_eligible"),
    }
    _write_json(run_dir / "submission.json", sub)


def write_plots(run_dir: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r and "kind" not in r]
    vals = [r for r in records if r.get("kind") == "val"]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss")
        if vals:
            ax.plot(
                [r["step"] for r in vals],
                [r["val_loss"] for r in vals],
                "o-",
                label="val loss (live weights)",
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=120)
        plt.close(fig)
    tps = [r for r in steps if "tok_s" in r]
    if tps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in tps], [r["tok_s"] for r in tps], "o-", label="tok/s (window)")
        ax.plot([r["step"] for r in tps], [r["tok_s_avg"] for r in tps], "--", label="tok/s (cumulative)")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "throughput.png", dpi=120)
        plt.close(fig)


def finish_report(run_dir: Path, report: dict, cfg: Config, data: Data, env: dict, log: Logger) -> dict:
    phases = report.get("phases", {})
    final_name = next((p for p in ("ttt", "sliding", "quantized", "prequant") if p in phases), None)
    if final_name:
        report["final"] = {"phase": final_name, **{k: phases[final_name][k] for k in ("val_loss", "val_bpb")}}
        report["val_loss"], report["val_bpb"] = report["final"]["val_loss"], report["final"]["val_bpb"]
    report["compliance"] = compliance(report, cfg, data)
    report["record_eligible"] = not report["non_record_reasons"]
    _write_json(run_dir / "report.json", report)
    write_submission(run_dir, report, cfg, env)
    write_plots(run_dir, log.records)
    c = report["compliance"]
    log(
        "compliance: "
        + " | ".join(
            f"{k} {v['status']}" + (f" ({v['value']:,.1f})" if "value" in v else "")
            for k, v in c.items()
            if k != "all_pass"
        )
        + ("" if report["record_eligible"] else f" | NON-RECORD: {'; '.join(report['non_record_reasons'])}")
    )
    log(f"report: {run_dir / 'report.json'}")
    return report


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="record", choices=sorted(PRESETS))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--data",
        default=None,
        help="FineWeb root (data/ of `python -m model.data download`); default: the embedded corpus",
    )
    p.add_argument("--run-id", default=os.environ.get("RUN_ID"), help="default: env RUN_ID or a timestamp")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", default=None, help="checkpoint directory runs/<id>/ckpt/step_NNNNNN")
    p.add_argument("--force", action="store_true", help="resume despite a config/code mismatch (non-record)")
    p.add_argument("--eval-only", default=None, help="an artifact (.ptz) or a checkpoint directory")
    p.add_argument("--train-only", action="store_true", help="stop after training (no artifact or evals)")
    for f in dataclasses.fields(Config):
        if f.name != "model_overrides":
            p.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None, metavar="V")
    for name in _model_fields():
        if name not in _SHARED:
            p.add_argument(
                "--model-" + name.replace("_", "-"), dest="model_" + name, default=None, metavar="V"
            )
    args = p.parse_args(argv)
    cli = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    cli_model = {k[6:]: v for k, v in vars(args).items() if k.startswith("model_") and v is not None}
    return args, cli, cli_model


def _run_id(args, cfg: Config, pd: Dist) -> str:
    rid = args.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.preset}-s{cfg.seed}"
    if pd.on:
        box = [rid]
        dist.broadcast_object_list(box, 0)
        rid = box[0]
    return rid


def main(argv=None) -> int:
    args, cli, cli_model = parse_args(argv)
    pd = setup_processes(args.device)
    try:
        return _main(args, cli, cli_model, pd)
    finally:
        if pd.on and dist.is_initialized():
            dist.destroy_process_group()


def _main(args, cli, cli_model, pd: Dist) -> int:
    t_start = time.perf_counter()
    eval_only = Path(args.eval_only) if args.eval_only else None
    resume = Path(args.resume) if args.resume else None
    meta = None
    if resume:
        meta = read_checkpoint_meta(resume)
    elif eval_only and eval_only.is_dir():
        meta = read_checkpoint_meta(eval_only)
    if (
        eval_only
        and eval_only.is_file()
        and (eval_only.parent / "config.json").is_file()
        and not (cli or cli_model)
    ):
        # The artifact does not hold its config: use the one its run wrote beside it.
        config_json = eval_only.parent / "config.json"
        cfg = config_from(json.loads(config_json.read_text(encoding="utf-8")), config_json)
    elif eval_only and meta is not None:
        cfg = config_from(meta, eval_only / "meta.json")
    else:
        cfg = resolve_config(args.preset, cli=cli, cli_model=cli_model)
    if pd.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    run_id = _run_id(args, cfg, pd)
    run_dir = Path(args.out_dir) / run_id
    if pd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    pd.barrier()
    log = Logger(run_dir, pd.main)
    env = environment(pd)
    mcfg = model_config(cfg, pd.device)
    data = load_data(cfg, args.data, mcfg.vocab_size, pd, log)
    env["corpus_fingerprint"] = data.fingerprint
    env["val_sha256"] = data.val_sha256
    log(f"run {run_id} | " + " | ".join(f"{k} {v}" for k, v in env.items()))
    log("config: " + json.dumps(asdict(cfg), sort_keys=True))
    log("model: " + json.dumps(asdict(mcfg), sort_keys=True))
    if pd.main:
        _write_json(
            run_dir / "config.json", {"config": asdict(cfg), "model": asdict(mcfg), "environment": env}
        )

    report: dict = {
        "run_id": run_id,
        "preset": args.preset,
        "mode": "eval-only" if eval_only else "train",
        "environment": env,
        "config": asdict(cfg),
        "model_config": asdict(mcfg),
        "config_hash": config_hash(cfg),
        "code_hash": code_hash(),
        "phases": {},
        "non_record_reasons": [],
    }
    reasons = report["non_record_reasons"]
    if pd.device.type != "cuda" or pd.world != 8 or "H100" not in (env["gpu"] or ""):
        reasons.append(f"not 8xH100 (world {pd.world}, {env['gpu'] or 'cpu'})")
    if data.paths.source != "fineweb":
        reasons.append(f"data is the {data.paths.source} corpus, not FineWeb")

    if eval_only and eval_only.is_file():
        return _eval_artifact_only(eval_only, cfg, data, pd, run_dir, report, env, log, t_start)

    run = Run(cfg, pd, run_id, run_dir, log, data)
    report.update(world_size=pd.world, grad_accum_steps=run.accum, micro_batch_seqs=run.micro_seqs)
    n_params = sum(p.numel() for p in run.model.parameters())
    log(
        f"model {cfg.model_preset}: {n_params:,} parameters | world {pd.world} x accum {run.accum} x "
        f"{run.micro_seqs} seqs x {cfg.train_seq_len} = {cfg.train_batch_tokens:,} tokens/step | "
        f"kernels mlp={mcfg.mlp_impl} ce={mcfg.ce_impl} | muon {cfg.muon_impl} | "
        f"compiled {run.model_c is not run.model}"
    )
    report["n_params"] = n_params

    start_step, elapsed = 0, 0.0
    if eval_only:  # a checkpoint directory: evaluate its EMA weights through the whole post-training path
        load_checkpoint(run, eval_only)
        reasons.append("evaluation of a checkpoint, not a full run")
    else:
        if resume:
            forced = check_resume(meta, cfg, pd, run.accum, args.force)
            reasons.append(f"resumed from {resume} at step {meta['step']}")
            reasons += [f"forced: {p}" for p in forced]
            if not meta.get("record_eligible", True):
                reasons.append("the resumed run was already non-record")
            run.non_record = reasons
            payload = load_checkpoint(run, resume)
            start_step, elapsed = meta["step"], meta["elapsed_s"]
            log(f"resumed from {resume}: step {start_step}, {elapsed:.1f} s of training")
        report["priming_seconds"] = run.prime()
        if resume:
            run.batches.load_state_dict(payload["loaders"])
            del payload
        run.non_record = reasons
        report.update(run.train(start_step, elapsed, args.save_every))
        if args.train_only:
            report["mode"] = "train-only"
            report["wall_seconds"] = time.perf_counter() - t_start
            if pd.main:
                finish_report(run_dir, report, cfg, data, env, log)
            return 0

    # After training: EMA weights -> pre-quant eval -> artifact -> dequantised / sliding / TTT evals.
    run.ema.copy_to(run.model)
    model = run.model
    report["phases"]["prequant"] = non_overlapping_eval(model, cfg, data, pd.device, log, "prequant")
    path = run_dir / "final_model.ptz"
    info = build_artifact(model, cfg, data, pd, pd.device, path, log)
    if pd.main:
        report["phases"]["artifact"] = {
            k: info[k]
            for k in (
                "model_bytes",
                "matrix_clip_sigmas",
                "fit_attempts",
                "n_quantized",
                "n_passthrough",
                "hessian_s",
                "quantize_s",
                "compress_s",
                "seconds",
            )
        }
        report["artifact_bytes"] = _artifact_bytes(info["size"])
        report["artifact_bytes"]["code_detail"] = {
            k: info["code"][k] for k in ("raw_bytes", "minified_bytes", "lzma_bytes", "stub_bytes")
        }
    report["phases"].update(evaluate_artifact(model, cfg, data, pd.device, path, log))
    return _close_eval(report, pd, run_dir, cfg, data, env, log, t_start)


def _artifact_bytes(size: dict) -> dict:
    keys = {"total": "artifact_bytes", "code": "code_bytes", "model": "model_bytes", "cap": "cap_bytes"}
    return {k: size[v] for k, v in keys.items()} | {"status": size["status"]}


def _close_eval(report, pd, run_dir, cfg, data, env, log, t_start) -> int:
    """Evaluation time (the challenge's eval budget: quantised + sliding + TTT), wall time, report."""
    report["eval_seconds"] = sum(
        report["phases"][p]["seconds"] for p in ("quantized", "sliding", "ttt") if p in report["phases"]
    )
    report["wall_seconds"] = time.perf_counter() - t_start
    if pd.main:
        finish_report(run_dir, report, cfg, data, env, log)
    return 0


def _eval_artifact_only(path: Path, cfg, data, pd, run_dir, report, env, log, t_start) -> int:
    from model.quant import code_size, size_report

    model = build_model(cfg, pd.device, pd)
    report["non_record_reasons"].append("evaluation of an existing artifact, not a full run")
    report["artifact_path"] = str(path)
    log(f"eval-only: {path}")
    report["phases"].update(evaluate_artifact(model, cfg, data, pd.device, path, log))
    if pd.main:
        report["artifact_bytes"] = _artifact_bytes(
            size_report(code_size(ROOT)["code_bytes"], path.stat().st_size)
        )
    return _close_eval(report, pd, run_dir, cfg, data, env, log, t_start)


if __name__ == "__main__":
    sys.exit(main())
