"""The scored pipeline (SPEC §5, Appendix B): what the shipped program executes, and train.py with it.

    Trainer(cfg, pd, data, hooks)   the model (and its compiled form), the optimizers, the EMA, this
                                    rank's batches; step, prime (untimed), validate, train (the loop)
    score(trainer, path, code)      EMA weights -> pre-quant eval -> GPTQ artifact -> dequantised,
                                    sliding-window and score-first TTT evals
    pin_attention(cfg, pd, log)     one attention backend on every rank (rank 0's measurement)

This is ONE piece of code for both drivers. `Hooks` is where a driver adds what the scored run does not
need: its defaults are the shipped program's (print on rank 0, nothing else); train.py's RunHooks
adds the metric records and line, checkpoints, the fault-injection test hooks and
the check that priming restored every state exactly. A hook never changes the run's numbers.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from optim.distributed import Dist
from optim.ema import EMA
from optim.optimizers import Optimizers
from optim.schedule import lr_multiplier, muon_momentum, progress, train_budget_s

from .data import RankBatches, RunData, ShuffledSequenceLoader
from .evaluate import eval_non_overlapping, eval_sliding_window, ttt_score_first
from .run_config import Config, batch_layout, model_config, ttt_config
from .train_step import build_model, check_finite, clip_gradients, compile_model, forward_backward


class Hooks:
    """What a driver adds to the pipeline. These defaults are the shipped program's."""

    def __init__(self, main: bool = True):
        self.main = main

    def log(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def metric(self, record: dict) -> None:
        """A validation record (train.py: metrics.jsonl)."""

    def phase(self, name: str, r: dict) -> dict:
        """One evaluation phase's result, logged (full precision: the numbers a submission reports)."""
        self.log(f"{name}: val_loss {r['val_loss']} | val_bpb {r['val_bpb']} | {r['seconds']:.1f} s")
        return r

    def step_done(self, trainer: Trainer, rec: dict, line: bool) -> None:
        """After every optimizer step; ``line``: a step whose metric line is logged."""
        if line:
            step, iterations = rec["step"], trainer.cfg.iterations
            self.log(f"step {step}/{iterations} | loss {rec['loss']} | train {rec['train_s']:.1f} s")

    def poison(self, step: int) -> bool:
        """Before step ``step``: True poisons its loss (train.py's fault-injection test hooks)."""
        return False

    def restored(self, trainer: Trainer, snap: tuple[dict, dict]) -> None:
        """After priming restored the snapshot ``snap`` (train.py checks it is exact)."""

    def checkpoint_due(self, step: int, last: bool) -> bool:
        return False

    def save(self, trainer: Trainer, step: int, elapsed_s: float) -> None:
        """A checkpoint at ``step`` (outside the training clock)."""


def set_precision(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA, from the start of a run (kernel checks included)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def pin_attention(cfg: Config, pd: Dist, log) -> Config:
    """ "auto" attention chooses by timing in each process, so two ranks could run different kernels:
    every rank takes rank 0's choice at the training shape (the eval shapes then use it too)."""
    from kernels.attention import measure

    mcfg = model_config(cfg, pd.device)
    if mcfg.attn_impl != "auto" or pd.device.type != "cuda":
        return cfg
    shape = (
        batch_layout(cfg, pd.world)[1],
        cfg.train_seq_len,
        mcfg.num_heads,
        mcfg.num_kv_heads,
        mcfg.head_dim,
    )
    dtype = getattr(torch, cfg.embed_dtype)  # the activations' dtype
    rec = measure(shape, dtype, pd.device) if pd.main else None
    choice = pd.broadcast_object(rec["choice"] if rec else None)
    if rec:
        times = ", ".join(
            f"{k} {e['ms']:.3f} ms" if "ms" in e else f"{k} {e['status']}"
            for k, e in rec["candidates"].items()
        )
        log(f"attention: {choice} on every rank ({rec['why']} at {shape}: {times})")
    return dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "attn_impl": choice})


class Trainer:
    """Everything one training process holds: the model (and its compiled form), the optimizers, the EMA
    and this rank's batches."""

    def __init__(self, cfg: Config, pd: Dist, data: RunData, hooks: Hooks):
        self.cfg, self.pd, self.device, self.data, self.hooks = cfg, pd, pd.device, data, hooks
        self.accum, self.micro_seqs = batch_layout(cfg, pd.world)
        self.model = build_model(cfg, self.device, pd)
        self.model_c = compile_model(self.model, cfg, self.device)
        self.opts = Optimizers(self.model, cfg, self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.batches = self.new_batches()

    def new_batches(self) -> RankBatches:
        layout = dict(seed=self.cfg.seed, rank=self.pd.rank, world=self.pd.world, accum=self.accum)
        return RankBatches(self.data.paths.train_pattern, self.cfg.train_seq_len, self.micro_seqs, **layout)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, step: int | str, lr_mul: float, momentum: float, poison: bool = False):
        """One optimizer step (Appendix B): micro-batches, clip, guard, optimizers. Returns (loss, norm)."""
        self.opts.set_schedule(lr_mul, momentum)
        loss = forward_backward(self.model_c, self.batches, self.accum, self.device, poison)
        norm = clip_gradients(self.opts.params, self.cfg.grad_clip_norm)
        loss, norm = check_finite(loss, norm, step, self.pd, self.hooks.log)
        self.opts.step()
        return loss, norm

    def prime(self) -> float:
        """Run warmup_steps real steps per loop mode (compiles both graphs and the optimizer paths), then
        restore the weights and every optimizer state. Returns its seconds."""
        cfg = self.cfg
        if cfg.warmup_steps <= 0:
            return 0.0
        t0 = time.perf_counter()
        snap = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            _clone(self.opts.state_dict()),
        )
        was_looping = bool(self.model.looping)
        modes = [False, True] if self.model.config.num_loops > 0 else [False]
        for looping in modes:
            self.model.set_looping(looping)
            for i in range(cfg.warmup_steps):
                self.step(f"priming step {i + 1} (looping {int(looping)})", 1.0, muon_momentum(cfg, 0))
        self.model.set_looping(was_looping)
        self.model.load_state_dict(snap[0])
        self.opts.load_state_dict(snap[1])
        self.hooks.restored(self, snap)
        self.batches = self.new_batches()
        self.sync()
        seconds = time.perf_counter() - t0
        self.hooks.log(
            f"priming: {cfg.warmup_steps} steps x {len(modes)} loop mode(s) in {seconds:.1f} s; weights and "
            "optimizer state (Muon momentum included) restored"
        )
        return seconds

    def validate(self, step: int) -> dict:
        r = eval_non_overlapping(
            self.model,
            self.data.val_tokens,
            seq_len=self.cfg.eval_seq_len,
            batch_seqs=self.cfg.val_batch_seqs,
            byte_counter=self.data.byte_counter,
            device=self.device,
        )
        self.hooks.log(
            f"step {step} | val_loss {r['val_loss']:.4f} | val_bpb {r['val_bpb']:.4f} | "
            f"looping {int(self.model.looping)} | {r['seconds']:.1f} s"
        )
        self.hooks.metric({"kind": "val", "step": step, "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]})
        return r

    def train(self, start_step: int = 0, elapsed_s: float = 0.0) -> dict:
        """The timed loop (SPEC §5.4-5.7): from ``start_step`` with ``elapsed_s`` of training already done
        (a resumed run), to the iterations or the wallclock budget, whichever comes first."""
        cfg, pd, hooks = self.cfg, self.pd, self.hooks
        budget = train_budget_s(cfg)
        can_loop = self.model.config.num_loops > 0 and cfg.enable_looping_at >= 0
        step, stop_after, last_val = start_step, None, None
        first_loss = last_loss = None
        self.sync()
        t0 = time.perf_counter()
        while True:
            last = step >= cfg.iterations or (stop_after is not None and step >= stop_after)
            periodic = cfg.val_loss_every > 0 and step > start_step and step % cfg.val_loss_every == 0
            saving = step > start_step and hooks.checkpoint_due(step, last)
            if last or periodic or saving:  # outside the training clock
                self.sync()
                elapsed_s += time.perf_counter() - t0
                if (last or periodic) and last_val != step:
                    self.validate(step)
                    last_val = step
                if saving:
                    hooks.save(self, step, elapsed_s)
                self.sync()
                t0 = time.perf_counter()
            if last:
                break
            frac = progress(cfg, step, elapsed_s + time.perf_counter() - t0)
            if can_loop and not self.model.looping and frac >= cfg.enable_looping_at:
                self.model.set_looping(True)
                hooks.log(f"step {step} | looping on (frac {frac:.3f})")
            lr_mul, mu = lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr), muon_momentum(cfg, step)
            loss, norm = self.step(step + 1, lr_mul, mu, poison=hooks.poison(step + 1))
            self.ema.update()
            step += 1
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            now_s = elapsed_s + time.perf_counter() - t0
            if budget > 0 and stop_after is None and pd.any(now_s >= budget):  # all ranks stop together
                stop_after = step
                hooks.log(f"step {step} | wallclock budget {budget:.0f} s reached at {now_s:.1f} s")
            looping = bool(self.model.looping)
            rec = dict(step=step, loss=loss, grad_norm=norm, lr_mul=lr_mul, momentum=mu, looping=looping)
            rec["train_s"] = now_s
            line = step % max(cfg.train_log_every, 1) == 0 or step in (1, cfg.iterations, stop_after)
            hooks.step_done(self, rec, line)
        return {
            "steps": step,
            "steps_this_run": step - start_step,
            "train_seconds": elapsed_s,
            "loss_first": first_loss,
            "loss_last": last_loss,
            "looping_final": bool(self.model.looping),
        }


def _clone(obj):
    """A deep copy of an optimizer state (tensors cloned)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------------------
# Artifact and evaluations
# ---------------------------------------------------------------------------------------------------------


def score(trainer: Trainer, path: Path, code_bytes: int) -> tuple[dict, dict | None]:
    """The EMA weights through pre-quant eval, the artifact (written to ``path``; ``code_bytes``: the
    shipped program's, the other part of the cap) and its evaluations. Returns (phases, artifact info;
    None off rank 0)."""
    cfg, data, pd, hooks, model = trainer.cfg, trainer.data, trainer.pd, trainer.hooks, trainer.model
    trainer.ema.copy_to(model)
    phases = {"prequant": non_overlapping_eval(model, cfg, data, pd.device, hooks, "prequant")}
    info = build_artifact(model, cfg, data, pd, path, hooks, code_bytes)
    phases.update(evaluate_artifact(model, cfg, data, pd.device, path, hooks))
    return phases, info


def build_artifact(model, cfg: Config, data: RunData, pd: Dist, path: Path, hooks: Hooks, code_bytes: int):
    """GPTQ Hessians from the first calibration batches of this rank's training stream (rank 0 only: the
    artifact comes from rank 0), quantise, compress, write atomically; every rank then waits for it."""
    from .quant import CAP_BYTES, collect_hessians, save_artifact, size_report  # brotli: artifact only

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
        info = save_artifact(
            model,
            hessians,
            path,
            passthrough_max_numel=cfg.quant_passthrough_max_numel,
            matrix_clip_sigmas=cfg.matrix_clip_sigmas,
            embed_clip_sigmas=cfg.embed_clip_sigmas,
            max_model_bytes=CAP_BYTES - code_bytes if cfg.fit_artifact_to_cap else None,
        )
        info["hessian_s"] = t1 - t0
    pd.barrier()
    if pd.main:
        size = info["size"] = size_report(code_bytes, info["model_bytes"])
        info["seconds"] = time.perf_counter() - t0
        k0, k = cfg.matrix_clip_sigmas, info["matrix_clip_sigmas"]
        refit = f" | int6 k raised {k0} -> {k:.4f} to fit" if k != k0 else ""
        hooks.log(
            f"artifact: {path.name} | model {size['model_bytes']:,} B + code {size['code_bytes']:,} B = "
            f"{size['artifact_bytes']:,} B ({size['status']} vs cap {size['cap_bytes']:,}) | "
            f"{info['n_quantized']} GPTQ + {info['n_passthrough']} passthrough tensors{refit} | "
            f"{info['quantize_s']:.1f} s GPTQ in {info['fit_attempts']} pass(es) | {info['seconds']:.1f} s"
        )
    return info


def evaluate_artifact(model, cfg: Config, data: RunData, device, path: Path, hooks: Hooks) -> dict:
    """Dequantised non-overlapping eval, sliding-window eval, then score-first TTT, each on a freshly
    loaded copy of the artifact, each timed."""
    from .quant import load_artifact

    load_artifact(model, path)
    phases = {"quantized": non_overlapping_eval(model, cfg, data, device, hooks, "quantized")}
    common = dict(seq_len=cfg.eval_seq_len, byte_counter=data.byte_counter, device=device)
    if cfg.sliding_window_enabled:
        r = eval_sliding_window(
            model, data.val_tokens, stride=cfg.eval_stride, batch_windows=cfg.val_batch_seqs, **common
        )
        phases["sliding"] = hooks.phase("sliding", r)
    if cfg.ttt_enabled:
        load_artifact(model, path)
        r = ttt_score_first(model, data.val_tokens, data.byte_counter, ttt_config(cfg), device=device)
        phases["ttt"] = hooks.phase("ttt", r)
    return phases


def non_overlapping_eval(model, cfg: Config, data: RunData, device, hooks: Hooks, phase: str) -> dict:
    """The record's non-overlapping eval of the looped model (SPEC §8.1), logged as `phase`."""
    model.set_looping(True)  # every eval runs the looped model
    r = eval_non_overlapping(
        model,
        data.val_tokens,
        seq_len=cfg.eval_seq_len,
        batch_seqs=cfg.val_batch_seqs,
        byte_counter=data.byte_counter,
        device=device,
    )
    return hooks.phase(phase, r)
