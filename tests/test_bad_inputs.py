"""What a bad input gets (issue #13, README "What a bad input gets"): one test per row of the issue's table.

row  input or fault                               test
1    id >= vocab in the val shard                 test_row01_02_out_of_range_id_is_refused_at_load[val]
2    id >= vocab in a train shard                 test_row01_02_out_of_range_id_is_refused_at_load[train]
                                                  test_row02_the_id_scan_is_timed_in_the_log
3    tokenizer with fewer pieces than the vocab   test_row03_tokenizer_smaller_than_the_vocab_is_refused,
                                                  test_row03_the_byte_tables_are_audited_at_start_up
4    record config on a CPU                       test_row04_record_config_on_cpu_is_refused_with_memory,
                                                  test_row04_memory_estimate_and_override
5    ITERATIONS=-5 / 0                            test_row05_iterations_must_be_positive_unless_eval_only,
                                                  test_row05_07_driver_refuses_before_any_work
6    zero lengths                                 test_row06_every_numeric_field_has_a_range,
                                                  test_row06_zero_lengths_are_refused_naming_the_variable
7    SEQ_LEN=0 (not a field)                      test_row07_look_alike_environment_gets_a_warning,
                                                  test_row05_07_driver_refuses_before_any_work
8    a flipped byte in rank0.pt                   test_row08_damaged_checkpoint_file_is_refused
9    --eval-only of a missing path                test_row09_missing_eval_only_path_is_checked_first
10   --eval-only of an artifact plus a flag       test_row10_flags_override_the_saved_config,
                                                  test_row10_eval_only_with_a_flag_end_to_end
11   malformed config.json                        test_row11_malformed_config_json_names_the_file
12   disk full during a checkpoint                test_row12_disk_full_checkpoint_is_skipped_clearly
13   the same --run-id twice                      test_row13_same_run_id_is_refused_default_ids_get_a_suffix
14   --run-id ../../escape                        test_row14_run_id_cannot_escape_the_out_dir
15   resume after a kill                          test_row15_resume_cuts_metrics_back_to_the_checkpoint
16   temporaries of an interrupted write          test_row16_resume_removes_leftover_temporaries
17   artifact file mode                           test_row17_artifact_has_the_mode_of_the_other_outputs
18   errors while loading                         test_row18_errors_land_in_the_runs_log_once_it_exists,
                                                  test_row18_an_error_after_start_up_lands_in_train_log
19   python -m bench plot DIR                     test_row19_bench_plot_takes_a_folder

A second sweep (more bad inputs, each refused at start-up, the run folder left as it was):
20   --resume with another config (refused)       test_row20_a_refused_resume_leaves_the_run_folder_as_it_was
21   --resume of a finished run                   test_row21_resuming_a_finished_run_is_refused
22   a model flag that changes tensor shapes      test_row22_artifact_and_checkpoint_shapes_are_checked
23   malformed checkpoint meta.json               test_row23_malformed_checkpoint_meta_names_the_file
24   --out-dir a file or unwritable, odd run ids  test_row24_out_dir_and_run_id_are_checked
25   KERNELS=triton where Triton cannot run       test_row25_kernels_asked_by_name_must_be_able_to_run
26   integers parsed exactly, val_max_tokens      test_row26_integers_are_exact_and_val_max_tokens_fits
27   --save-every -1                              test_row27_negative_save_every_is_refused
28   Ctrl-C during training                       test_row28_ctrl_c_says_how_to_go_on

Over 500 lines on purpose: the table above is the index, and one file keeps it beside its tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model import atomic, data, metrics, run_config
from model.run import checkpoint, run_folder, validate
from model.train_step import FAULT_ENV
from optim.distributed import Dist

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1024  # the tiny preset's


def _clean_env(**extra) -> dict:
    names = {f.name.upper() for f in dataclasses.fields(run_config.Config)}
    names |= {n.upper() for n in run_config.model_fields()}
    env = {k: v for k, v in os.environ.items() if k not in names and k not in ("RUN_ID", FAULT_ENV)}
    env.pop("TRITON_INTERPRET", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train(args: list[str], out_dir: Path, env: dict | None = None, preset: str = "tiny", check=True):
    cmd = [
        sys.executable,
        "train.py",
        "--preset",
        preset,
        "--device",
        "cpu",
        "--out-dir",
        str(out_dir),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _clean_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _refused(proc, *needles: str) -> str:
    """A refusal: exit status 1, one message on stderr (no traceback) holding every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    return proc.stderr


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "kind" not in r]


@pytest.fixture(scope="module")
def corpus() -> data.DataPaths:
    return data.default_corpus(VOCAB)


def _fineweb_copy(root: Path, corpus, tokenizer: bytes | None = None) -> Path:
    """The embedded corpus laid out as a FineWeb download (python train.py --data root)."""
    ds = root / "datasets" / f"fineweb10B_sp{VOCAB}"
    ds.mkdir(parents=True)
    for f in corpus.dataset_dir.glob("fineweb_*.bin"):
        shutil.copy(f, ds / f.name)
    (root / "tokenizers").mkdir()
    model = root / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    if tokenizer is None:
        shutil.copy(corpus.tokenizer_model, model)
    else:
        model.write_bytes(tokenizer)
    return root


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A 4-step training run with checkpoints at steps 2 and 4 (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("small")
    _train(
        ["--run-id", "small", "--train-only", "--save-every", "2"],
        out,
        _clean_env(ITERATIONS=4, WARMUP_STEPS=0),
    )
    return out / "small"


def _copy_run(run: Path, out: Path) -> Path:
    shutil.copytree(run, out / run.name)
    return out / run.name


# ---------------------------------------------------------------------------------------------------------
# Data and tokenizer (rows 1-3)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "train"])
def test_row01_02_out_of_range_id_is_refused_at_load(tmp_path, corpus, split):
    root = _fineweb_copy(tmp_path / "data", corpus)
    name = "fineweb_val_000000.bin" if split == "val" else "fineweb_train_000003.bin"
    shard = root / "datasets" / f"fineweb10B_sp{VOCAB}" / name
    tokens = np.array(data.read_shard(shard))
    tokens[1234] = 1500
    data.write_shard(shard, tokens)
    proc = _train(["--data", str(root), "--run-id", "r"], tmp_path / "runs", check=False)
    _refused(proc, str(shard), "token id 1500 >= vocab size 1024 at position 1,234")
    assert "priming" not in proc.stdout and not (tmp_path / "runs").exists()  # before any work or write


def test_row02_the_id_scan_is_timed_in_the_log(small_run):
    log = (small_run / "train.log").read_text()
    assert re.search(
        r"ids < 1024 checked on this rank's 8 \([\d,]+ tokens\) in [\d.]+ s \([\d.]+ G tokens/s\)", log
    )
    assert "start-up checks passed in " in log


def test_row03_tokenizer_smaller_than_the_vocab_is_refused(tmp_path, corpus):
    docs = data.StdlibCorpus(max_files=10).documents()
    root = _fineweb_copy(tmp_path / "data", corpus, tokenizer=data.train_tokenizer(docs, 512))
    proc = _train(["--data", str(root), "--run-id", "r"], tmp_path / "runs", check=False)
    _refused(
        proc, "fineweb_1024_bpe.model has 512 pieces but the model's vocab_size is 1024", "bits per byte"
    )
    assert not (tmp_path / "runs").exists()


def test_row03_the_byte_tables_are_audited_at_start_up(monkeypatch):
    cfg = run_config.resolve_config("tiny", env={})
    real = metrics.build_byte_luts

    def leading_space_twice(sp, vocab_size=None, device=None):
        base, space, boundary = real(sp, vocab_size, device)
        return metrics.ByteLUTs(base + space.to(base.dtype), space, boundary)

    monkeypatch.setattr(metrics, "build_byte_luts", leading_space_twice)
    with pytest.raises(
        SystemExit, match="(?s)byte tables of .* disagree with its decoder.*leading space counted twice"
    ):
        data.load_run_data(cfg, None, VOCAB, False, lambda msg: None)


# ---------------------------------------------------------------------------------------------------------
# Configuration (rows 4-7, 9-11)
# ---------------------------------------------------------------------------------------------------------


def test_row04_record_config_on_cpu_is_refused_with_memory(tmp_path):
    t0 = time.perf_counter()
    proc = _train(["--run-id", "r"], tmp_path, preset="record", check=False)
    _refused(proc, "this config needs about 35.", "GiB", "--preset tiny --device cpu", "--allow-large-cpu")
    assert time.perf_counter() - t0 < 60 and not tmp_path.joinpath("r").exists()  # at once: no corpus build


def test_row04_memory_estimate_and_override():
    cpu = Dist()
    record = run_config.resolve_config("record", env={})
    mcfg = run_config.model_config(record, torch.device("cuda"))
    est = validate.estimate_memory(record, mcfg, world=1, accum=8, training=True)
    assert est["params"] == 35_944_537 and 33 * 2**30 < est["total"] < 38 * 2**30  # measured peak 35.0 GiB
    with pytest.raises(SystemExit, match="no CUDA device is visible.*--preset tiny --device cpu"):
        validate.check_memory(record, mcfg, cpu, 8, False, "auto", False, print)
    with pytest.raises(SystemExit, match="--device cpu was asked for.*--allow-large-cpu"):
        validate.check_memory(record, mcfg, cpu, 8, False, "cpu", False, print)
    lines = []
    validate.check_memory(record, mcfg, cpu, 8, False, "cpu", True, lines.append)
    assert "WARNING: --allow-large-cpu" in lines[0]
    tiny = run_config.resolve_config("tiny", env={})
    est = validate.check_memory(
        tiny, run_config.model_config(tiny, cpu.device), cpu, 1, False, "cpu", False, print
    )
    assert est["total"] < 2**30


def test_row05_iterations_must_be_positive_unless_eval_only():
    for value in ("-5", "0"):
        with pytest.raises(
            run_config.ConfigError, match=f"iterations={value} \\(from environment ITERATIONS\\)"
        ):
            run_config.resolve_config("tiny", env={"ITERATIONS": value})
    assert run_config.resolve_config("tiny", env={"ITERATIONS": "0"}, training=False).iterations == 0
    with pytest.raises(run_config.ConfigError, match="iterations=-5"):
        run_config.resolve_config("tiny", env={"ITERATIONS": "-5"}, training=False)
    with pytest.raises(SystemExit, match="--iterations"):  # --train-only is training: 0 is refused
        run_config.config_for_run("tiny", {"iterations": "0"}, {}, None, None, env={})


def test_row05_07_driver_refuses_before_any_work(tmp_path):
    proc = _train(["--run-id", "r"], tmp_path, _clean_env(ITERATIONS=-5, SEQ_LEN=0), check=False)
    _refused(proc, "config iterations=-5 (from environment ITERATIONS): must be >= 1")
    assert "WARNING: environment SEQ_LEN='0' is not a config field" in proc.stdout
    assert "TRAIN_SEQ_LEN" in proc.stdout and not tmp_path.joinpath("r").exists()


def test_row06_every_numeric_field_has_a_range():
    numeric = {f.name for f in dataclasses.fields(run_config.Config) if f.type in ("int", "float")}
    assert numeric == set(run_config.RANGES), numeric ^ set(run_config.RANGES)
    model_numeric = {f.name for f in dataclasses.fields(run_config.GPTConfig) if f.type in ("int", "float")}
    assert model_numeric == set(run_config.MODEL_RANGES), model_numeric ^ set(run_config.MODEL_RANGES)
    for preset in run_config.PRESETS:  # the presets are inside their own ranges
        run_config.resolve_config(preset, env={})


@pytest.mark.parametrize(
    "env, cli, phrase",
    [
        ({"TRAIN_SEQ_LEN": "0"}, {}, "train_seq_len=0 (from environment TRAIN_SEQ_LEN): must be >= 1"),
        ({"EVAL_SEQ_LEN": "0"}, {}, "eval_seq_len=0 (from environment EVAL_SEQ_LEN): must be >= 1"),
        ({"TRAIN_BATCH_TOKENS": "0"}, {}, "train_batch_tokens=0 (from environment TRAIN_BATCH_TOKENS)"),
        ({}, {"ema_decay": "1"}, "ema_decay=1.0 (from --ema-decay): must be in [0, 1)"),
        ({"MATRIX_LR": "nan"}, {}, "matrix_lr=nan (from environment MATRIX_LR)"),
        (
            {"VOCAB_SIZE": "70000"},
            {},
            "vocab_size=70000 (from environment VOCAB_SIZE): must be in [2, 65536]",
        ),
        ({}, {"eval_stride": "256"}, "eval_stride=256 (from --eval-stride): must be <= eval_seq_len 128"),
    ],
)
def test_row06_zero_lengths_are_refused_naming_the_variable(env, cli, phrase):
    with pytest.raises(run_config.ConfigError) as exc:
        run_config.resolve_config("tiny", env=env, cli=cli)
    assert phrase in str(exc.value)


def test_row07_look_alike_environment_gets_a_warning():
    env = {"SEQ_LEN": "0", "WARMDOWN_ITERS": "3500", "ITERATION": "5", "TRAIN_SEQ_LEN": "64"}
    env |= {"PATH": "/usr/bin", "HOME": "/root", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    warnings = run_config.unknown_env_warnings(env)
    assert len(warnings) == 3, warnings
    said = {
        name: next(w for w in warnings if f"environment {name}=" in w)
        for name in ("SEQ_LEN", "WARMDOWN_ITERS", "ITERATION")
    }
    assert "TRAIN_SEQ_LEN" in said["SEQ_LEN"] and "EVAL_SEQ_LEN" in said["SEQ_LEN"]
    assert "WARMDOWN_FRAC" in said["WARMDOWN_ITERS"] and "did you mean ITERATIONS?" in said["ITERATION"]


def test_row09_missing_eval_only_path_is_checked_first(tmp_path):
    t0 = time.perf_counter()
    proc = _train(
        ["--eval-only", str(tmp_path / "nope.ptz"), "--run-id", "r"], tmp_path, preset="record", check=False
    )
    _refused(proc, "--eval-only", "nope.ptz: no such file or directory", "final_model.ptz")
    assert time.perf_counter() - t0 < 60 and not tmp_path.joinpath("r").exists()


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    """A tiny model's artifact (round-to-nearest: no Hessians needed) with its run's config.json beside it."""
    from model.quant import save_artifact
    from model.train_step import build_model

    folder = tmp_path_factory.mktemp("artifact")
    cfg = run_config.resolve_config("tiny", env={})
    save_artifact(build_model(cfg, torch.device("cpu")), None, folder / "final_model.ptz", method="rtn")
    atomic.write_json(folder / "config.json", {"config": dataclasses.asdict(cfg)})
    return folder / "final_model.ptz"


def test_row10_flags_override_the_saved_config(tiny_artifact):
    cfg = run_config.config_for_run(
        "record", {"ttt_enabled": "0"}, {"qk_gain_init": "4.5"}, tiny_artifact, None, env={"TTT_LR": "0.5"}
    )
    assert cfg.model_preset == "tiny" and cfg.train_seq_len == 128  # the saved config, not the preset
    assert (cfg.ttt_enabled, cfg.ttt_lr, cfg.model_overrides) == (False, 0.5, {"qk_gain_init": 4.5})
    validate.check_artifact(tiny_artifact, run_config.model_config(cfg, torch.device("cpu")))
    record = run_config.resolve_config("record", env={})
    with pytest.raises(SystemExit, match="final_model.ptz: the artifact lacks .* tensors of the model"):
        validate.check_artifact(tiny_artifact, run_config.model_config(record, torch.device("cpu")))


def test_row10_eval_only_with_a_flag_end_to_end(tmp_path, tiny_artifact):
    flags = ["--sliding-window-enabled", "0", "--ttt-enabled", "0", "--run-id", "e"]
    _train(["--eval-only", str(tiny_artifact), *flags], tmp_path, preset="record")
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    assert rep["config"]["model_preset"] == "tiny" and set(rep["phases"]) == {"quantized"}


def test_row11_malformed_config_json_names_the_file(tmp_path, tiny_artifact):
    shutil.copy(tiny_artifact, tmp_path / "final_model.ptz")
    (tmp_path / "config.json").write_text('{"config": ')
    with pytest.raises(SystemExit, match="config.json: not a readable JSON file .*JSONDecodeError"):
        run_config.config_for_run("tiny", {}, {}, tmp_path / "final_model.ptz", None, env={})
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(SystemExit, match="config.json: expected a JSON object"):
        run_config.config_for_run("tiny", {}, {}, tmp_path / "final_model.ptz", None, env={})


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (rows 8, 12)
# ---------------------------------------------------------------------------------------------------------


def test_row08_damaged_checkpoint_file_is_refused(tmp_path, small_run):
    run = _copy_run(small_run, tmp_path)
    ck = run / "ckpt" / "step_000004"
    meta = checkpoint.read_checkpoint_meta(ck)
    assert checkpoint.verify_checkpoint_file(ck, 0, meta) is None
    raw = bytearray((ck / "rank0.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit inside the weights
    (ck / "rank0.pt").write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as exc:
        checkpoint.verify_checkpoint_file(ck, 0, meta)
    msg = str(exc.value)
    assert (
        str(ck / "rank0.pt") in msg
        and "damaged" in msg
        and "--resume " + str(run / "ckpt" / "step_000002") in msg
    )
    parts = SimpleNamespace(model=None, ema=None, opts=None)
    with pytest.raises(SystemExit, match="damaged"):  # verified at load too
        checkpoint.load_checkpoint(ck, Dist(), **vars(parts))
    ck2 = run / "ckpt" / "step_000002"  # a checkpoint with steps left to train, damaged the same way
    raw = bytearray((ck2 / "rank0.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (ck2 / "rank0.pt").write_bytes(bytes(raw))
    proc = _train(
        ["--resume", str(ck2), "--train-only"],
        tmp_path,
        _clean_env(ITERATIONS=4, WARMUP_STEPS=0),
        check=False,
    )
    _refused(proc, "rank0.pt: damaged")
    assert "ERROR: " in (run / "train.log").read_text().splitlines()[-1]  # and the run's log says so


class _Stub:
    def __init__(self, state):
        self.state, self.looping = state, False

    def state_dict(self):
        return self.state


def _save(ckdir: Path, lines: list) -> Path | None:
    weights = {"w": torch.randn(64, 64)}
    parts = dict(model=_Stub(weights), ema=_Stub(weights), opts=_Stub({}), batches=_Stub([]))
    meta = {"step": 1, "elapsed_s": 0.0, "world_size": 1, "grad_accum_steps": 1, "config": {}}
    meta |= {"config_hash": "", "code_hash": ""}  # what read_checkpoint_meta requires
    return checkpoint.save_checkpoint(ckdir, Dist(), **parts, meta=meta, log=lines.append)


def test_row12_disk_full_checkpoint_is_skipped_clearly(tmp_path, monkeypatch):
    lines: list[str] = []
    prev = _save(tmp_path / "ckpt" / "step_000001", lines)
    assert prev is not None and (prev / "meta.json").is_file()

    real = atomic.atomic_write

    class FullDisk:  # the file system takes 100 bytes, then says it is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def disk_full(path, *a, **k):
        with real(path, *a, **k) as f:
            yield FullDisk(f)

    monkeypatch.setattr(checkpoint, "atomic_write", disk_full)
    ck = tmp_path / "ckpt" / "step_000002"
    assert _save(ck, lines) is None  # skipped: the caller's run goes on
    msg = lines[-1]
    assert (
        msg.startswith("ERROR: checkpoint")
        and f"{ck / 'rank0.pt'}: disk full, " in msg
        and "bytes needed" in msg
    )
    assert f"previous checkpoint ({prev}) is kept; training continues" in msg
    assert not ck.exists() and atomic.leftover_temporaries(tmp_path) == []
    assert checkpoint.verify_checkpoint_file(prev, 0, checkpoint.read_checkpoint_meta(prev)) is None

    monkeypatch.setattr(checkpoint, "atomic_write", real)  # too little free space: not even tried
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    assert _save(ck, lines) is None and "1,000 free" in lines[-1] and not ck.exists()


# ---------------------------------------------------------------------------------------------------------
# The run folder (rows 13-18)
# ---------------------------------------------------------------------------------------------------------


def test_row13_same_run_id_is_refused_default_ids_get_a_suffix(tmp_path, small_run):
    run = _copy_run(small_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = _train(["--run-id", "small", "--train-only"], tmp_path, _clean_env(ITERATIONS=2), check=False)
    _refused(proc, f"--run-id small: {run} already holds a run", f"--resume {run}/ckpt/step_NNNNNN")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # untouched
    assert run_folder.choose(str(tmp_path), None, "small", None) == ("small-2", tmp_path / "small-2", False)
    (tmp_path / "empty").mkdir()  # an empty folder (or one a refused run left nothing in) is free
    assert run_folder.choose(str(tmp_path), "empty", "x", None) == ("empty", tmp_path / "empty", False)


def test_row13_a_run_folder_in_use_is_refused(tmp_path):
    held = run_folder.RunFolder(tmp_path / "r", continuing=False)
    with pytest.raises(SystemExit, match="in use by another train.py process"):
        run_folder.RunFolder(tmp_path / "r", continuing=True)
    assert held.run_dir.is_dir()
    held.release()  # the run ended: no .lock is left, and the folder can be locked again
    assert not (tmp_path / "r" / run_folder.LOCK).exists()
    again = run_folder.RunFolder(tmp_path / "r", continuing=True)
    again.release()


LOCK_SCRIPT = """
import sys
from pathlib import Path
from model.run import run_folder
folder = run_folder.RunFolder(Path(sys.argv[1]), continuing=False)
print("locked", flush=True)
if sys.argv[2] == "error":
    raise RuntimeError("a run that fails")
if sys.argv[2] == "wait":
    sys.stdin.readline()
"""


@pytest.mark.parametrize("end", ["normal", "error"])
def test_row13_a_finished_run_keeps_no_lock_file(tmp_path, end):
    run_dir = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, "-c", LOCK_SCRIPT, str(run_dir), end], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.startswith("locked") and (proc.returncode != 0) == (end == "error"), proc.stderr
    assert run_dir.is_dir() and not (run_dir / run_folder.LOCK).exists()


def test_row13_the_lock_holds_while_the_run_lives(tmp_path):
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-c", LOCK_SCRIPT, str(run_dir), "wait"]
    with subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().startswith("locked")
        assert (run_dir / run_folder.LOCK).exists()
        with pytest.raises(SystemExit, match="in use by another train.py process"):
            run_folder.RunFolder(run_dir, continuing=True)
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and not (run_dir / run_folder.LOCK).exists()


def test_row13_a_lock_on_the_file_of_a_run_that_just_ended_is_taken_again(tmp_path, monkeypatch):
    """Between our open() and flock() the run that held the folder ends and removes its .lock: the
    flock then succeeds on a file no longer in the folder, and would lock nothing. It is retaken."""
    run_dir, real, removed = tmp_path / "r", run_folder.fcntl.flock, []

    def flock(fh, op):
        if not removed:  # the other run ends right now
            removed.append((run_dir / run_folder.LOCK).unlink())
        return real(fh, op)

    monkeypatch.setattr(run_folder.fcntl, "flock", flock)
    folder = run_folder.RunFolder(run_dir, continuing=True)
    assert removed and os.stat(run_dir / run_folder.LOCK).st_ino == os.fstat(folder._lock.fileno()).st_ino
    folder.release()


@pytest.mark.parametrize("run_id", ["../../escape", "/tmp/abs", "a/b", "..", ".", ""])
def test_row14_run_id_cannot_escape_the_out_dir(tmp_path, run_id):
    with pytest.raises(SystemExit, match="a run id is one folder name inside --out-dir"):
        run_folder.choose(str(tmp_path / "runs"), run_id, "x", None)
    if run_id == "../../escape":
        proc = _train(["--run-id", run_id], tmp_path / "a" / "b" / "runs", check=False)
        _refused(proc, "--run-id '../../escape'")
        assert not (tmp_path / "a" / "escape").exists() and not (tmp_path / "a" / "b" / "runs").exists()


@pytest.fixture(scope="module")
def resumed(small_run, tmp_path_factory) -> SimpleNamespace:
    """small_run continued from its step-2 checkpoint in its own folder, after a 'kill' (two leftover
    temporary files of an interrupted write, one half-written metric line)."""
    run = _copy_run(small_run, tmp_path_factory.mktemp("resumed"))
    planted = [run / "ckpt" / "step_000004" / ".rank0.pt.k1ll3d_x.tmp", run / ".report.json.abcd1234.tmp"]
    for p in planted:
        p.write_bytes(b"x" * 1000)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    before = _steps_all(run)
    proc = _train(
        ["--resume", str(run / "ckpt" / "step_000002"), "--train-only", "--save-every", "2"],
        run.parent,
        _clean_env(ITERATIONS=4, WARMUP_STEPS=0),
    )
    return SimpleNamespace(run=run, before=before, planted=planted, proc=proc)


def _steps_all(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


def test_row15_resume_cuts_metrics_back_to_the_checkpoint(resumed, small_run):
    assert _steps(resumed.run) == [1, 2, 3, 4]  # each step once (without the cut: 1, 2, 3, 4, 3, 4)
    assert "metrics.jsonl cut back to step 2: 4 record(s) after it removed" in resumed.proc.stdout
    full = {r["step"]: r for r in map(json.loads, _steps_all(small_run)) if "kind" not in r}
    again = {r["step"]: r for r in map(json.loads, _steps_all(resumed.run)) if "kind" not in r}
    for s in (3, 4):
        assert again[s]["loss"] == pytest.approx(full[s]["loss"], rel=1e-6)
    log = (resumed.run / "train.log").read_text()
    assert log.count("run small |") == 2 and "resumed from" in log  # the log keeps both starts


def test_row16_resume_removes_leftover_temporaries(resumed):
    assert not any(p.exists() for p in resumed.planted)
    assert atomic.leftover_temporaries(resumed.run) == []
    assert "removed 2 temporary file(s) of interrupted writes (2,000 bytes)" in resumed.proc.stdout


def test_row17_artifact_has_the_mode_of_the_other_outputs(tmp_path):
    from model.quant import save_artifact
    from model.train_step import build_model

    cfg = run_config.resolve_config("tiny", env={})
    save_artifact(build_model(cfg, torch.device("cpu")), None, tmp_path / "final_model.ptz", method="rtn")
    atomic.write_json(tmp_path / "report.json", {})
    with open(tmp_path / "train.log", "a") as f:  # as the Logger writes it
        f.write("x\n")
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode["final_model.ptz"] == mode["report.json"] == mode["train.log"] == 0o666 & ~atomic.umask(), (
        mode
    )


def test_row18_errors_land_in_the_runs_log_once_it_exists(tmp_path, small_run, corpus):
    run = _copy_run(small_run, tmp_path)
    root = _fineweb_copy(tmp_path / "data", corpus)
    shard = root / "datasets" / f"fineweb10B_sp{VOCAB}" / "fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    args = ["--resume", str(run / "ckpt" / "step_000002"), "--data", str(root), "--train-only"]
    proc = _train(args, tmp_path, _clean_env(ITERATIONS=4, WARMUP_STEPS=0), check=False)
    _refused(proc, f"shard {shard}: size mismatch")
    assert f"ERROR: shard {shard}: size mismatch" in (run / "train.log").read_text()
    assert _steps(run) == [1, 2, 3, 4]  # a refused resume cuts nothing


def test_row18_an_error_after_start_up_lands_in_train_log(tmp_path, monkeypatch):
    import train

    for name in _clean_env().keys() ^ os.environ.keys():
        monkeypatch.delenv(name, raising=False)

    def boom(self):
        raise RuntimeError("boom while priming")

    monkeypatch.setattr(train.Trainer, "prime", boom)
    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
        "--run-id",
        "r",
        "--train-only",
    ]
    with pytest.raises(RuntimeError, match="boom"):
        train.main(argv)
    log = (tmp_path / "r" / "train.log").read_text()
    assert "start-up checks passed" in log and "ERROR: RuntimeError: boom while priming" in log
    assert "Traceback (most recent call last)" in log and "in boom" in log


# ---------------------------------------------------------------------------------------------------------
# bench (row 19)
# ---------------------------------------------------------------------------------------------------------


def test_row19_bench_plot_takes_a_folder(tmp_path, capsys):
    from bench.__main__ import main as bench_main

    src = ROOT / "bench" / "results" / "h100-2026-11-24" / "mlp" / "results.json"
    (tmp_path / "runs" / "a").mkdir(parents=True)
    shutil.copy(src, tmp_path / "runs" / "a" / "results.json")
    (tmp_path / "runs" / "report.json").write_text("{}")  # other JSON is not a results file: skipped
    assert bench_main(["plot", str(tmp_path / "runs")]) == 0
    assert any((tmp_path / "runs" / "a" / "plots").glob("*.png"))
    (tmp_path / "empty").mkdir()
    assert bench_main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bench plot: {tmp_path / 'empty'}: no results JSON under")
    # a results file that cannot be read is named, with why: not "there is none"
    (tmp_path / "bad" / "b").mkdir(parents=True)
    (tmp_path / "bad" / "b" / "results.json").write_text(src.read_text()[:500])  # truncated
    assert bench_main(["plot", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable results JSON" in err[0], err
    assert f"{tmp_path / 'bad' / 'b' / 'results.json'}: not valid JSON" in err[0], err
    shutil.copy(src, tmp_path / "bad" / "results.json")  # beside a good one: plotted, the bad one named
    assert bench_main(["plot", str(tmp_path / "bad")]) == 0
    err = capsys.readouterr().err
    assert f"left out {tmp_path / 'bad' / 'b' / 'results.json'}: not valid JSON" in err, err


# ---------------------------------------------------------------------------------------------------------
# A second sweep (rows 20-27)
# ---------------------------------------------------------------------------------------------------------


def _contents(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_row20_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, small_run):
    """The config is compared before the folder is touched: no metrics cut back, no config.json rewritten."""
    run = _copy_run(small_run, tmp_path)
    before = _contents(run)
    args = ["--resume", str(run / "ckpt" / "step_000002"), "--train-only", "--matrix-lr", "0.05"]
    proc = _train(args, tmp_path, _clean_env(ITERATIONS=4, WARMUP_STEPS=0), check=False)
    _refused(proc, "refusing to resume: config differs", "matrix_lr")
    assert _contents(run) == before


def test_row21_resuming_a_finished_run_is_refused(tmp_path, small_run):
    run = _copy_run(small_run, tmp_path)
    before = _contents(run)
    ck = run / "ckpt" / "step_000004"
    proc = _train(
        ["--resume", str(ck), "--train-only"], tmp_path, _clean_env(ITERATIONS=4, WARMUP_STEPS=0), check=False
    )
    _refused(proc, "at step 4 of 4: nothing is left to train", f"--eval-only {ck}")
    assert _contents(run) == before


def test_row22_artifact_and_checkpoint_shapes_are_checked(tiny_artifact, small_run):
    """Same tensor names, other shapes (--model-mlp-mult 3): refused at start-up, not a load traceback."""
    wider = run_config.config_for_run("tiny", {}, {"mlp_mult": "3"}, tiny_artifact, None, env={})
    mcfg = run_config.model_config(wider, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"final_model.ptz: \d+ tensors have other shapes"):
        validate.check_artifact(tiny_artifact, mcfg)
    ck = small_run / "ckpt" / "step_000002"
    validate.check_checkpoint_model(
        ck, run_config.model_config(run_config.resolve_config("tiny", env={}), torch.device("cpu"))
    )
    with pytest.raises(SystemExit, match=r"rank0.pt: \d+ tensors have other shapes"):
        validate.check_checkpoint_model(ck, mcfg)


def test_row23_malformed_checkpoint_meta_names_the_file(tmp_path, small_run):
    run = _copy_run(small_run, tmp_path)
    ck = run / "ckpt" / "step_000004"
    (ck / "meta.json").write_text('{"step": "two", "config": {}}')
    with pytest.raises(SystemExit, match=r"step_000004/meta.json: missing or malformed step, elapsed_s"):
        checkpoint.read_checkpoint_meta(ck)


def test_row24_out_dir_and_run_id_are_checked(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="--out-dir .*afile: exists and is not a folder"):
        run_folder.choose(str(tmp_path / "afile"), "r", "d", None)
    with pytest.raises(SystemExit, match="cannot create a folder in /proc"):
        run_folder.choose("/proc/no-such-runs", "r", "d", None)
    with pytest.raises(SystemExit, match="afile is a file, not a folder"):
        run_folder.choose(str(tmp_path), "afile", "d", None)
    for bad in (" ", "x" * 300):
        with pytest.raises(SystemExit, match="a run id is one folder name inside --out-dir"):
            run_folder.choose(str(tmp_path), bad, "d", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing


def test_row25_kernels_asked_by_name_must_be_able_to_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = run_config.resolve_config("tiny", env={"KERNELS": "triton"})
    mcfg = run_config.model_config(cfg, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"mlp_impl, ce_impl, \w.*_impl='triton' .*cannot run .*KERNELS"):
        validate.check_kernels_can_run(mcfg, torch.device("cpu"))
    auto = run_config.model_config(run_config.resolve_config("tiny", env={}), torch.device("cpu"))
    validate.check_kernels_can_run(auto, torch.device("cpu"))  # "auto" takes the references here


def test_row26_integers_are_exact_and_val_max_tokens_fits():
    assert run_config.resolve_config("tiny", env={"SEED": "12345678901234567"}).seed == 12345678901234567
    assert run_config.resolve_config("tiny", env={"ITERATIONS": "1e3"}).iterations == 1000
    for env, phrase in (
        ({"SEED": str(2**63)}, "seed=9223372036854775808"),
        ({"ITERATIONS": "1e30"}, "ITERATIONS='1e30': expected an integer"),
        ({"VAL_MAX_TOKENS": "10"}, "val_max_tokens=10 .*> eval_seq_len 128"),
    ):
        with pytest.raises(run_config.ConfigError, match=phrase):
            run_config.resolve_config("tiny", env=env)


def test_row26_a_value_of_the_wrong_type_names_the_flag_and_the_type():
    for cli, phrase in (
        ({"iterations": "ten"}, "--iterations='ten': expected an integer, e.g. 120"),
        ({"matrix_lr": "fast"}, "--matrix-lr='fast': expected a number, e.g. 0.022"),
        ({"ttt_enabled": "maybe"}, "--ttt-enabled='maybe': expected 0/1/true/false"),
    ):
        with pytest.raises(run_config.ConfigError, match=re.escape(phrase)):
            run_config.resolve_config("tiny", env={}, cli=cli)
    with pytest.raises(run_config.ConfigError, match=re.escape("ITERATIONS='ten': expected an integer")):
        run_config.resolve_config("tiny", env={"ITERATIONS": "ten"})


def test_row26_a_bad_flag_is_one_line_and_every_flag_says_what_it_takes(capsys):
    import train

    for argv, phrase in (
        (["--preset", "bogus"], "argument --preset: invalid choice: 'bogus'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--save-every", "x"], "argument --save-every: invalid int value: 'x'"),
    ):
        with pytest.raises(SystemExit) as exc:
            train.parse_args(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("train.py: error: ") and phrase in err and "--help lists every flag" in err, err
    parser = run_config.FlagParser(prog="train.py")
    run_config.add_config_flags(parser)
    flags = {a.dest: a for a in parser._actions if a.dest.startswith(("cfg_", "model_"))}
    assert len(flags) == len(dataclasses.fields(run_config.Config)) - 1 + len(run_config.model_fields()) - 2
    for dest, action in flags.items():
        name = dest.split("_", 1)[1]
        assert action.metavar not in (None, "V") and action.help and "\n" not in action.help, dest
        spec_what = (
            run_config.RANGES.get(name) if dest.startswith("cfg_") else run_config.MODEL_RANGES.get(name)
        )
        if spec_what:  # generated from the field's range and description, not written a second time
            assert run_config.describe_range(spec_what[0]) in action.help, (dest, action.help)
    assert flags["cfg_iterations"].metavar == "INT" and flags["cfg_matrix_lr"].metavar == "FLOAT"
    assert flags["cfg_ttt_enabled"].metavar == "0|1" and flags["cfg_kernels"].metavar == "{auto,triton,torch}"
    assert "SDClip k, int6 matrices" in flags["cfg_matrix_clip_sigmas"].help  # the dataclass's comment
    text = parser.format_help()
    assert " V " not in text and "env MATRIX_LR" in text


def test_row27_negative_save_every_is_refused(tmp_path):
    proc = _train(["--save-every", "-1"], tmp_path, check=False)
    assert proc.returncode == 2 and "--save-every -1: must be >= 0" in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_row28_ctrl_c_says_how_to_go_on(tmp_path):
    """SIGINT mid-training: exit 130, no traceback, the folder and the newest checkpoint to resume from."""
    import signal

    cmd = [sys.executable, "train.py", "--preset", "tiny", "--device", "cpu", "--out-dir", str(tmp_path)]
    cmd += ["--run-id", "c", "--train-only", "--save-every", "1"]
    env = _clean_env(ITERATIONS=100000, WARMUP_STEPS=0, COMPILE="off")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "c").glob("ckpt/step_*/meta.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert f"interrupted (Ctrl-C); its folder is {tmp_path / 'c'}: continue with --resume" in err
    assert "ERROR: interrupted (Ctrl-C)" in (tmp_path / "c" / "train.log").read_text()
