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
(model/run/validate.py; README "What a bad input gets").

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

This file is the driver. The scored pipeline (model, optimizers, the loop, EMA, artifact, evaluations) is
model/pipeline.py, the one piece of code the shipped program runs too (`python -m model.run.shipped_code`
writes that program); what this file adds to it is the run machinery: model/run/ (validate, preflight,
checkpoint, report, run_folder, shipped_code) through RunHooks, and bench/ (env: environment and GPU
peaks; plot: the training plots).
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
from model.atomic import write_json
from model.config import KERNEL_IMPL_FIELDS
from model.pipeline import Hooks, Trainer, evaluate_artifact, score, set_precision
from model.run import checkpoint, validate
from model.run.preflight import confirm_on_path, run_preflight
from model.run.report import (
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
from model.run.run_folder import interrupted
from model.run.shipped_code import code_hash, code_size
from model.run_config import PRESETS, FlagParser, add_config_flags, config_flags, model_config
from model.train_step import FAULT_EXIT_ENV, build_model, compile_cache, die_if_planted, fault_step
from optim.distributed import Dist, setup_processes


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
# The run machinery on the scored pipeline (model/pipeline.py)
# ---------------------------------------------------------------------------------------------------------


class RunHooks(Hooks):
    """What train.py adds to the scored pipeline, none of it in the shipped program: train.log and
    metrics.jsonl, the metric line, checkpoints, the fault-injection test hooks, the priming check."""

    def __init__(self, logger: Logger, pd: Dist, run_id: str, run_dir: Path, save_every: int):
        super().__init__(pd.main)
        self.logger, self.pd, self.save_every = logger, pd, save_every
        self.run_id, self.run_dir = run_id, run_dir
        self.fault, self.exit_at = fault_step(pd.rank), fault_step(pd.rank, FAULT_EXIT_ENV)
        self.code_hash = code_hash()
        self.non_record: list[str] = []
        self.meter: StepMeter | None = None  # train() sets it: it starts at the run's elapsed time

    def log(self, msg: str) -> None:
        self.logger(msg)

    def metric(self, record: dict) -> None:
        self.logger.metric(record)

    def phase(self, name: str, r: dict) -> dict:
        return log_phase(name, r, self.logger)

    def step_done(self, trainer: Trainer, rec: dict, line: bool) -> None:
        tokens = trainer.cfg.train_batch_tokens
        self.meter.add(tokens, trainer.model.flops_per_token(rec["looping"]) * tokens)
        if line:
            self.logger(self.meter.line(rec, trainer.cfg.iterations, rec["train_s"]))
        self.logger.metric(rec)

    def poison(self, step: int) -> bool:
        die_if_planted(self.exit_at, step, self.pd.rank)
        return self.fault == step

    def restored(self, trainer: Trainer, snap: tuple[dict, dict]) -> None:
        checkpoint.check_restored(trainer.model, trainer.opts, snap)

    def checkpoint_due(self, step: int, last: bool) -> bool:
        return self.save_every > 0 and (step % self.save_every == 0 or last)

    def save(self, trainer: Trainer, step: int, elapsed_s: float) -> None:
        meta = checkpoint.checkpoint_meta(trainer.cfg, self.pd, trainer.accum, step, elapsed_s)
        meta.update(code_hash=self.code_hash, run_id=self.run_id, record_eligible=not self.non_record)
        parts = dict(model=trainer.model, ema=trainer.ema, opts=trainer.opts, batches=trainer.batches)
        ckdir = self.run_dir / "ckpt" / f"step_{step:06d}"
        checkpoint.save_checkpoint(ckdir, self.pd, **parts, meta=meta, log=self.logger)

    def train(self, trainer: Trainer, start_step: int, elapsed_s: float) -> dict:
        """The scored loop (model/pipeline.py), metered; its result with throughput and memory."""
        cuda = trainer.device.type == "cuda"
        gpu = torch.cuda.get_device_name(trainer.device) if cuda else None
        self.meter = StepMeter(elapsed_s, peak_flops(gpu), self.pd.world, trainer.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(trainer.device)
        r = trainer.train(start_step, elapsed_s)
        tokens, seconds = self.meter.total_tokens, r["train_seconds"] - elapsed_s
        return {
            **r,
            "train_tokens": tokens,
            "tokens_per_s": tokens / max(seconds, 1e-9) if r["steps_this_run"] else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(trainer.device) if cuda else None,
            "peak_rss_bytes": peak_rss_bytes(),
        }


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
    # Configuration, processes, data: model/run/validate.py resolves the config (the preset, or the config of
    # what is evaluated, with env and flag overrides) and checks it, the paths, the memory, the run folder
    # and the data before anything is built or written; then it makes the run folder (log, lock)
    start = validate.startup(args, cli, cli_model, pd, log)
    cfg, data, run_id, run_dir = start.cfg, start.data, start.run_id, start.run_dir
    eval_only, resume, meta = start.eval_only, start.resume, start.meta
    mcfg = model_config(cfg, pd.device)
    set_precision(pd.device)
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
        hooks = RunHooks(log, pd, run_id, run_dir, 0)
        report["phases"].update(evaluate_artifact(model, cfg, data, pd.device, eval_only, hooks))
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
    hooks = RunHooks(log, pd, run_id, run_dir, args.save_every)
    trainer = Trainer(cfg, pd, data, hooks)
    report.update(world_size=pd.world, grad_accum_steps=trainer.accum, micro_batch_seqs=trainer.micro_seqs)
    report["n_params"] = n_params = sum(p.numel() for p in trainer.model.parameters())
    log(
        f"model {cfg.model_preset}: {n_params:,} parameters | world {pd.world} x accum {trainer.accum} x "
        f"{trainer.micro_seqs} seqs x {cfg.train_seq_len} = {cfg.train_batch_tokens:,} tokens/step | "
        f"kernels {' '.join(f'{n[:-5]}={getattr(mcfg, n)}' for n in KERNEL_IMPL_FIELDS)} | "
        f"muon {cfg.muon_impl} | "
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
            hooks.non_record = reasons
            payload = checkpoint.load_checkpoint(
                resume, pd, model=trainer.model, ema=trainer.ema, opts=trainer.opts
            )
            start_step, elapsed = meta["step"], meta["elapsed_s"]
            log(f"resumed from {resume}: step {start_step}, {elapsed:.1f} s of training")
        # Priming (untimed), then the loop
        report["priming_seconds"] = trainer.prime()
        c = report["compile_cache"] = compile_cache()
        log(
            f"compile cache: FX graphs {c['fx_graph_hits']} hit / {c['fx_graph_misses']} compiled, "
            f"AOTAutograd {c['autograd_hits']} hit / {c['autograd_misses']} compiled ({c['inductor_dir']})"
        )
        confirm_on_path(report["kernels"], mcfg, cfg, pd.device, log)  # what ran, proven or not
        if resume:
            trainer.batches.load_state_dict(payload["loaders"])
            del payload
        hooks.non_record = reasons
        report.update(hooks.train(trainer, start_step, elapsed))
        if args.train_only:
            report["mode"] = "train-only"
            report["wall_seconds"] = time.perf_counter() - t_start
            return finish()

    # EMA weights -> pre-quant eval -> artifact -> dequantised / sliding / TTT evals (the scored pipeline)
    code = code_size()
    phases, info = score(trainer, run_dir / "final_model.ptz", code["code_bytes"])
    report["phases"].update(phases)
    if pd.main:
        record_artifact(report, {**info, "code": code})

    # Report
    close_evaluation(report, t_start)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
