"""Train, quantise and evaluate the Parameter Golf record model (PR #1523) in one run.

    python train.py --preset tiny --device cpu         # whole pipeline, ~15 s on 2 CPU cores
    python train.py                                    # record config, one GPU (grad accumulation 8)
    torchrun --standalone --nproc_per_node=8 train.py  # the record: 8 GPUs, grad accumulation 1
    SEED=42 TTT_ENABLED=1 HASH_EMBED_ENABLED=1 TTT_LR=0.01 MUON_MOMENTUM=0.97 \\
        torchrun --standalone --nproc_per_node=8 train.py    # the seed's command line works as is
    python train.py --data data                        # FineWeb sp8192 (python -m model.data download)
    python train.py --eval-only runs/<run id>/final_model.ptz   # evaluate an artifact (or a checkpoint dir)
    python train.py --save-every 500                   # checkpoints in runs/<run id>/ckpt/step_NNNNNN/
    python train.py --resume runs/<run id>/ckpt/step_001000     # continue that run in its folder (non-record)

Every run writes runs/<run id>/: train.log (environment header, config, metric lines), metrics.jsonl
(one line per step and per validation), config.json, report.json (val loss/bpb per phase, artifact
bytes, times, throughput, a compliance block), submission.json (the challenge's format), loss.png and
throughput.png, and final_model.ptz (the artifact). Bad input is refused before anything is built or written
(model/validate.py; README "What a bad input gets").

--eval-only with an artifact uses the config.json its run wrote beside it (env and flags override it);
with a checkpoint directory, its meta.json's config and rank 0's weights, on any number of processes.

Configuration: model/run_config.py's `Config` holds the #1523 hyperparameters (SPEC.md Appendix A); a
preset (`record`, `tiny`) is overridden by environment variables named like the fields in upper case
(SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS, TTT_ENABLED, MUON_MOMENTUM, ...; GPTConfig fields too, e.g.
QK_GAIN_INIT), then by CLI flags (--matrix-lr 0.03, --model-num-layers 9). The resolved config is logged.

Pipeline (SPEC §5, Appendix B): untimed priming (compile both loop modes, then restore weights and every
optimizer state exactly) -> timed loop (wallclock cap minus the GPTQ reserve, LR warmdown and recurrence
by fraction of the cap, Muon momentum warmup, grad clip, EMA, a non-finite guard before every optimizer
step) -> EMA weights -> pre-quant eval -> GPTQ artifact -> dequantised eval -> sliding-window eval ->
score-first TTT (with the hash embedding).

Data layout across processes: micro-batch j of rank r reads the loader of "data rank" r * accum + j of
world * accum (model.data.RankBatches): one GPU with accumulation 8 sees exactly the batches of 8 GPUs.

This file is the driver; what it uses lives in the room that says what it holds: model/ (run_config,
train_step, checkpoint, report, data, evaluate, quant), optim/ (optimizers, schedule, ema, distributed),
bench/ (env: environment and GPU peaks; plot: the training plots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.env import peak_flops, run_environment
from model import checkpoint, validate
from model.atomic import write_json
from model.data import RankBatches, RunData, ShuffledSequenceLoader
from model.evaluate import eval_non_overlapping, eval_sliding_window, ttt_score_first
from model.preflight import confirm_on_path, run_preflight
from model.report import (
    Logger,
    StepMeter,
    artifact_bytes,
    close_evaluation,
    finish_report,
    log_phase,
    new_report,
    peak_rss_bytes,
    record_artifact,
)
from model.run_config import (
    PRESETS,
    Config,
    FlagParser,
    add_config_flags,
    batch_layout,
    config_flags,
    model_config,
    ttt_config,
)
from model.run_folder import interrupted
from model.shipped_code import code_hash, code_size
from model.train_step import (
    FAULT_EXIT_ENV,
    build_model,
    check_finite,
    clip_gradients,
    compile_cache,
    compile_model,
    die_if_planted,
    fault_step,
    forward_backward,
)
from optim.distributed import Dist, setup_processes
from optim.ema import EMA
from optim.optimizers import Optimizers
from optim.schedule import lr_multiplier, muon_momentum, progress, train_budget_s


def parse_args(argv=None):
    p = FlagParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--preset P] [--device D] [--eval-only PATH | --resume DIR] [--FIELD V ...]",
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
    p.add_argument(
        "--allow-large-cpu", action="store_true", help="run a config too large for a CPU there anyway"
    )
    add_config_flags(p)
    args = p.parse_args(argv)
    if args.save_every < 0:
        p.error(f"--save-every {args.save_every}: must be >= 0 (0: no checkpoints)")
    return (args, *config_flags(args))


# ---------------------------------------------------------------------------------------------------------
# Model and optimizers, priming, the loop
# ---------------------------------------------------------------------------------------------------------


class Trainer:
    """Everything one training process holds: the model (and its compiled form), the optimizers, the EMA
    and this rank's batches."""

    def __init__(self, cfg: Config, pd: Dist, run_id: str, run_dir: Path, log: Logger, data: RunData):
        self.cfg, self.pd, self.device, self.log, self.data = cfg, pd, pd.device, log, data
        self.run_id, self.run_dir = run_id, run_dir
        self.accum, self.micro_seqs = batch_layout(cfg, pd.world)
        self.model = build_model(cfg, self.device, pd)
        self.model_c = compile_model(self.model, cfg, self.device)
        self.opts = Optimizers(self.model, cfg, self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.batches = self.new_batches()
        self.code_hash = code_hash()
        self.compile_cache: dict | None = None
        self.non_record: list[str] = []

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
        snap = checkpoint.snapshot(self.model, self.opts)
        was_looping = bool(self.model.looping)
        modes = [False, True] if self.model.config.num_loops > 0 else [False]
        for looping in modes:
            self.model.set_looping(looping)
            for i in range(cfg.warmup_steps):
                self.step(f"priming step {i + 1} (looping {int(looping)})", 1.0, muon_momentum(cfg, 0))
        self.model.set_looping(was_looping)
        checkpoint.restore(self.model, self.opts, snap)
        self.batches = self.new_batches()
        self.sync()
        seconds = time.perf_counter() - t0
        c = self.compile_cache = compile_cache()
        hits = f"FX graphs {c['fx_graph_hits']} hit / {c['fx_graph_misses']} compiled"
        self.log(
            f"priming: {cfg.warmup_steps} steps x {len(modes)} loop mode(s) in {seconds:.1f} s; weights and "
            f"optimizer state (Muon momentum included) restored exactly | compile cache: {hits}, "
            f"AOTAutograd {c['autograd_hits']} hit / {c['autograd_misses']} compiled ({c['inductor_dir']})"
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
        self.log(
            f"step {step} | val_loss {r['val_loss']:.4f} | val_bpb {r['val_bpb']:.4f} | "
            f"looping {int(self.model.looping)} | {r['seconds']:.1f} s"
        )
        self.log.metric({"kind": "val", "step": step, "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]})
        return r

    def save(self, step: int, elapsed_s: float) -> None:
        meta = checkpoint.checkpoint_meta(self.cfg, self.pd, self.accum, step, elapsed_s)
        meta.update(code_hash=self.code_hash, run_id=self.run_id, record_eligible=not self.non_record)
        parts = dict(model=self.model, ema=self.ema, opts=self.opts, batches=self.batches)
        ckdir = self.run_dir / "ckpt" / f"step_{step:06d}"
        checkpoint.save_checkpoint(ckdir, self.pd, **parts, meta=meta, log=self.log)

    def train(self, start_step: int = 0, elapsed_s: float = 0.0, save_every: int = 0) -> dict:
        cfg, pd, log = self.cfg, self.pd, self.log
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        meter = StepMeter(elapsed_s, peak_flops(gpu), pd.world, self.device)
        budget, fault = train_budget_s(cfg), fault_step(pd.rank)
        exit_at = fault_step(pd.rank, FAULT_EXIT_ENV)
        can_loop = self.model.config.num_loops > 0 and cfg.enable_looping_at >= 0
        step, stop_after, last_val, start_elapsed = start_step, None, None, elapsed_s
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
                    self.save(step, elapsed_s)
                self.sync()
                t0 = time.perf_counter()
            if last:
                break
            frac = progress(cfg, step, elapsed_s + time.perf_counter() - t0)
            if can_loop and not self.model.looping and frac >= cfg.enable_looping_at:
                self.model.set_looping(True)
                log(f"step {step} | looping on (frac {frac:.3f})")
            lr_mul, mu = lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr), muon_momentum(cfg, step)
            die_if_planted(exit_at, step + 1, pd.rank)
            loss, norm = self.step(step + 1, lr_mul, mu, poison=fault == step + 1)
            self.ema.update()
            step += 1
            flops = self.model.flops_per_token(bool(self.model.looping)) * cfg.train_batch_tokens
            meter.add(cfg.train_batch_tokens, flops)
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            now_s = elapsed_s + time.perf_counter() - t0
            if budget > 0 and stop_after is None and pd.any(now_s >= budget):  # all ranks stop together
                stop_after = step
                log(f"step {step} | wallclock budget {budget:.0f} s reached at {now_s:.1f} s")
            looping = bool(self.model.looping)
            rec = dict(step=step, loss=loss, grad_norm=norm, lr_mul=lr_mul, momentum=mu, looping=looping)
            rec["train_s"] = now_s
            if step % max(cfg.train_log_every, 1) == 0 or step in (1, cfg.iterations, stop_after):
                log(meter.line(rec, cfg.iterations, now_s))
            log.metric(rec)
        steps_run = step - start_step
        return {
            "steps": step,
            "steps_this_run": steps_run,
            "train_seconds": elapsed_s,
            "train_tokens": meter.total_tokens,
            "tokens_per_s": meter.total_tokens / max(elapsed_s - start_elapsed, 1e-9) if steps_run else None,
            "loss_first": first_loss,
            "loss_last": last_loss,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda"
            else None,
            "peak_rss_bytes": peak_rss_bytes(),
            "looping_final": bool(self.model.looping),
        }


# ---------------------------------------------------------------------------------------------------------
# Artifact and evaluations
# ---------------------------------------------------------------------------------------------------------


def build_artifact(model, cfg: Config, data: RunData, pd: Dist, path: Path, log: Logger) -> dict:
    """GPTQ Hessians from the first calibration batches of this rank's training stream (rank 0 only: the
    artifact comes from rank 0), quantise, compress, write atomically; every rank then waits for it."""
    from model.quant import CAP_BYTES, collect_hessians, save_artifact, size_report  # brotli: artifact only

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
        code = code_size()
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


def evaluate_artifact(model, cfg: Config, data: RunData, device, path: Path, log: Logger) -> dict:
    """Dequantised non-overlapping eval, sliding-window eval, then score-first TTT, each on a freshly
    loaded copy of the artifact, each timed."""
    from model.quant import load_artifact

    load_artifact(model, path)
    phases = {"quantized": non_overlapping_eval(model, cfg, data, device, log, "quantized")}
    common = dict(seq_len=cfg.eval_seq_len, byte_counter=data.byte_counter, device=device)
    if cfg.sliding_window_enabled:
        r = eval_sliding_window(
            model, data.val_tokens, stride=cfg.eval_stride, batch_windows=cfg.val_batch_seqs, **common
        )
        phases["sliding"] = log_phase("sliding", r, log)
    if cfg.ttt_enabled:
        load_artifact(model, path)
        r = ttt_score_first(model, data.val_tokens, data.byte_counter, ttt_config(cfg), device=device)
        phases["ttt"] = log_phase("ttt", r, log)
    return phases


def non_overlapping_eval(model, cfg: Config, data: RunData, device, log: Logger, phase: str) -> dict:
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
    return log_phase(phase, r, log)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args, cli, cli_model = parse_args(argv)
    pd = setup_processes(args.device)
    log = Logger(None, pd.main)  # into runs/<run id>/train.log once the start-up checks have made it
    try:
        return run(args, cli, cli_model, pd, log)
    except KeyboardInterrupt:  # Ctrl-C: where the run stands and how to go on, no traceback
        log.error(SystemExit(msg := interrupted(log.log_path and log.log_path.parent)))
        print(msg, file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as exc:
        log.error(exc)  # the run's log holds the error too (a refusal before its folder exists: stderr only)
        raise
    finally:
        pd.close()


def run(args, cli: dict, cli_model: dict, pd: Dist, log: Logger) -> int:
    t_start = time.perf_counter()
    # Configuration, processes, data: model/validate.py resolves the config (the preset, or the config of
    # what is evaluated, with env and flag overrides) and checks it, the paths, the memory, the run folder
    # and the data before anything is built or written; then it makes the run folder (log, lock)
    start = validate.startup(args, cli, cli_model, pd, log)
    cfg, data, run_id, run_dir = start.cfg, start.data, start.run_id, start.run_dir
    eval_only, resume, meta = start.eval_only, start.resume, start.meta
    mcfg = model_config(cfg, pd.device)
    if pd.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = run_environment(pd.device, pd.world)
    env.update(corpus_fingerprint=data.paths.fingerprint, val_sha256=data.val_sha256)
    log(f"run {run_id} | " + " | ".join(f"{k} {v}" for k, v in env.items()))
    log("config: " + json.dumps(asdict(cfg), sort_keys=True))
    log("model: " + json.dumps(asdict(mcfg), sort_keys=True))
    if pd.main:
        write_json(
            run_dir / "config.json",
            {"preset": start.preset, "config": asdict(cfg), "model": asdict(mcfg), "environment": env},
        )
    mode = "eval-only" if eval_only else "train"
    report = new_report(run_id, start.preset, mode, cfg, mcfg, env, data.paths.source)
    reasons = report["non_record_reasons"]

    def finish() -> int:
        if pd.main:
            finish_report(run_dir, report, cfg, data.val_tokens.numel() - 1, env, log)
            from bench.plot import plot_training  # matplotlib: only once the run is over

            plot_training(run_dir, log.records)
        return 0

    if eval_only and eval_only.is_file():  # an artifact: its evaluations only
        reasons.append("evaluation of an existing artifact, not a full run")
        report["artifact_path"] = str(eval_only)
        log(f"eval-only: {eval_only}")
        model = build_model(cfg, pd.device, pd)
        report["phases"].update(evaluate_artifact(model, cfg, data, pd.device, eval_only, log))
        if pd.main:
            from model.quant import size_report

            report["artifact_bytes"] = artifact_bytes(
                size_report(code_size()["code_bytes"], eval_only.stat().st_size)
            )
        close_evaluation(report, t_start)
        return finish()

    # Model and optimizers, on kernels proven here first (a failing one runs as its reference)
    cfg, report["kernels"] = run_preflight(cfg, pd, log)
    mcfg = model_config(cfg, pd.device)
    trainer = Trainer(cfg, pd, run_id, run_dir, log, data)
    report.update(world_size=pd.world, grad_accum_steps=trainer.accum, micro_batch_seqs=trainer.micro_seqs)
    report["n_params"] = n_params = sum(p.numel() for p in trainer.model.parameters())
    log(
        f"model {cfg.model_preset}: {n_params:,} parameters | world {pd.world} x accum {trainer.accum} x "
        f"{trainer.micro_seqs} seqs x {cfg.train_seq_len} = {cfg.train_batch_tokens:,} tokens/step | "
        f"kernels mlp={mcfg.mlp_impl} ce={mcfg.ce_impl} | muon {cfg.muon_impl} | "
        f"compiled {trainer.model_c is not trainer.model}"
    )
    if eval_only:  # a checkpoint directory: evaluate its EMA weights through the whole post-training path
        checkpoint.load_checkpoint(eval_only, pd, model=trainer.model, ema=trainer.ema)  # weights only
        reasons.append("evaluation of a checkpoint, not a full run")
    else:
        start_step, elapsed = 0, 0.0
        if resume:
            reasons.append(f"resumed from {resume} at step {meta['step']}")
            reasons += [f"forced: {p}" for p in start.forced]  # checked at start-up, before the folder
            if not meta.get("record_eligible", True):
                reasons.append("the resumed run was already non-record")
            trainer.non_record = reasons
            payload = checkpoint.load_checkpoint(
                resume, pd, model=trainer.model, ema=trainer.ema, opts=trainer.opts
            )
            start_step, elapsed = meta["step"], meta["elapsed_s"]
            log(f"resumed from {resume}: step {start_step}, {elapsed:.1f} s of training")
        # Priming (untimed), then the loop
        report["priming_seconds"] = trainer.prime()
        report["compile_cache"] = trainer.compile_cache
        confirm_on_path(report["kernels"], mcfg, cfg, pd.device, log)  # what ran, proven or not
        if resume:
            trainer.batches.load_state_dict(payload["loaders"])
            del payload
        trainer.non_record = reasons
        report.update(trainer.train(start_step, elapsed, args.save_every))
        if args.train_only:
            report["mode"] = "train-only"
            report["wall_seconds"] = time.perf_counter() - t_start
            return finish()

    # EMA weights -> pre-quant eval -> artifact -> dequantised / sliding / TTT evals
    trainer.ema.copy_to(trainer.model)
    model = trainer.model
    report["phases"]["prequant"] = non_overlapping_eval(model, cfg, data, pd.device, log, "prequant")
    path = run_dir / "final_model.ptz"
    info = build_artifact(model, cfg, data, pd, path, log)
    if pd.main:
        record_artifact(report, info)
    report["phases"].update(evaluate_artifact(model, cfg, data, pd.device, path, log))

    # Report
    close_evaluation(report, t_start)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
