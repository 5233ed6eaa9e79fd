"""A run's folder, runs/<run id>/: one run per folder, never two at once, nothing written outside --out-dir.

- A run id is one folder name: "../x", "a/b" or an absolute path are refused (they would write elsewhere).
- A folder that already holds a run (any file not hidden) is never reused: an explicit --run-id (or
  RUN_ID) is refused; a default id (time-preset-seed) gets a fresh suffix (-2, -3, ...).
- --resume runs/<id>/ckpt/step_N continues run <id> in its own folder (without --run-id, or with that
  id): leftover temporary files of interrupted writes are removed, and metrics.jsonl is cut back to the
  checkpoint's step, so that the steps after it are not there twice; train.log keeps growing.
- The folder is locked (flock on .lock) while a run uses it: a second process is refused. The lock file
  is removed when the process ends (normally, by an error or Ctrl-C; a killed process leaves it, and
  then it locks nothing: the lock is the flock, not the file), so a finished run's folder holds none.
- A run refused by the start-up checks writes nothing: a new folder is made only once they pass.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from ..atomic import atomic_write, folder_blocker, remove_temporaries

LOCK = ".lock"


MAX_ID_BYTES = 200  # a folder name, with room for the default id's "-N" suffix under the usual 255


def default_run_id(preset: str, seed: int) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}-s{seed}"


def check_run_id(run_id: str) -> None:
    """A run id names one folder inside --out-dir."""
    bad = not run_id.strip() or run_id in (".", "..") or "\0" in run_id or len(run_id.encode()) > MAX_ID_BYTES
    bad = bad or any(sep and sep in run_id for sep in ("/", os.sep, os.altsep))
    if bad:
        raise SystemExit(
            f"--run-id {run_id[:80]!r}: a run id is one folder name inside --out-dir (not blank, no '/', "
            f"not '.' or '..', at most {MAX_ID_BYTES} bytes); pick another, e.g. --run-id my-run (use "
            "--out-dir to write elsewhere)"
        )


def check_out_dir(out_dir: str) -> None:
    """--out-dir is a folder this process can write in, or can be made where it is asked for."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise SystemExit(f"--out-dir {out_dir}: exists and is not a folder; pass a folder (default: runs)")
    problem = folder_blocker(out_dir)
    if problem:
        raise SystemExit(f"--out-dir {out_dir}: {problem}; pass another folder")


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: any entry but hidden ones (the lock, temporaries)."""
    return run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir())


def resumed_run_dir(resume: Path | None) -> Path | None:
    """The run folder a checkpoint runs/<id>/ckpt/step_N belongs to (None: not laid out so)."""
    if resume is None or resume.resolve().parent.name != "ckpt":
        return None
    return resume.resolve().parent.parent


def choose(out_dir: str, run_id: str | None, default_id: str, resume: Path | None) -> tuple[str, Path, bool]:
    """(run id, run folder, continuing): where this run writes, and whether it continues the run of the
    checkpoint it resumes in that run's own folder. Refuses an id that would escape --out-dir or reuse a
    folder that holds another run."""
    own = resumed_run_dir(resume)
    check_out_dir(out_dir)
    if run_id is None and own is not None:
        return own.name, own, True
    if run_id is not None:
        check_run_id(run_id)
        run_dir = Path(out_dir) / run_id
        if own is not None and run_dir.resolve() == own:
            return run_id, run_dir, True
        if run_dir.exists() and not run_dir.is_dir():
            raise SystemExit(f"--run-id {run_id}: {run_dir} is a file, not a folder; pick another --run-id")
        if holds_a_run(run_dir):
            hint = (
                f" or continue it: --resume {run_dir}/ckpt/step_NNNNNN" if (run_dir / "ckpt").is_dir() else ""
            )
            raise SystemExit(
                f"--run-id {run_id}: {run_dir} already holds a run; pick another --run-id (or none, for a "
                f"fresh timestamped one){hint}. Two runs never share a folder."
            )
        return run_id, run_dir, False
    run_id = default_id
    for n in range(2, 1000):
        if not holds_a_run(Path(out_dir) / run_id):
            break
        run_id = f"{default_id}-{n}"
    return run_id, Path(out_dir) / run_id, False


class RunFolder:
    """The folder of a running run, locked for its lifetime (the lock goes with the process)."""

    def __init__(self, run_dir: Path, continuing: bool):
        self.run_dir, self.continuing = run_dir, continuing
        run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(run_dir / LOCK)
        if self._lock is None:
            raise SystemExit(
                f"{run_dir} is in use by another train.py process (it holds {run_dir / LOCK}); wait for "
                "it to end, or pick another --run-id"
            )
        atexit.register(self.release)
        if not continuing and holds_a_run(run_dir):  # another process made it since choose()
            self.release()
            raise SystemExit(f"{run_dir} already holds a run; pick another --run-id")

    def release(self) -> None:
        """Remove the lock file, then unlock: the folder of a finished run keeps no .lock (idempotent)."""
        if self._lock is None or self._lock.closed:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / LOCK).unlink()  # still holding it: no other process can take it meanwhile
        self._lock.close()
        atexit.unregister(self.release)

    def resume_at(self, step: int) -> tuple[list[str], list[dict]]:
        """Tidy a continued run's folder before it resumes at ``step``: remove the temporaries of
        interrupted writes and cut metrics.jsonl back to ``step``. Returns (log lines, kept records)."""
        notes = []
        files, size = remove_temporaries(self.run_dir)
        if files:
            notes.append(f"removed {files} temporary file(s) of interrupted writes ({size:,} bytes)")
        kept, dropped = cut_metrics(self.run_dir / "metrics.jsonl", step)
        if dropped:
            notes.append(f"metrics.jsonl cut back to step {step}: {dropped} record(s) after it removed")
        return notes, kept


def _lock(path: Path):
    """The open lock file, flock'ed, or None when another process holds it. A process that ends removes
    the file while holding it, so a lock taken on a file that is no longer ``path`` is stale: try again."""
    for _ in range(5):
        fh = open(path, "a")  # noqa: SIM115 (held until release() or the process ends)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:  # removed by the run that just ended
            same = False
        if same:
            return fh
        fh.close()
    raise SystemExit(f"{path}: could not be locked (it keeps being replaced); is another train.py starting?")


def cut_metrics(path: Path, step: int) -> tuple[list[dict], int]:
    """Keep the metric records of steps <= ``step`` (training steps and validations); drop the rest (the
    steps a resumed run repeats, the evaluations of an earlier end). Returns (kept records, dropped)."""
    if not path.is_file():
        return [], 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            dropped += 1
            continue
        if isinstance(rec.get("step"), int) and rec["step"] <= step and rec.get("kind") in (None, "val"):
            kept.append(rec)
        else:
            dropped += 1
    if dropped:
        with atomic_write(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
    return kept, dropped


def interrupted(run_dir: Path | None) -> str:
    """What Ctrl-C says: the run's folder, its newest checkpoint to continue from, or that there is none."""
    msg = "interrupted (Ctrl-C)"
    if run_dir is None:
        return msg + " before the run folder was made: nothing was written"
    done = sorted(run_dir.glob("ckpt/step_*/meta.json"))
    go_on = (
        f"continue with --resume {done[-1].parent}" if done else "no checkpoint was written (--save-every)"
    )
    return f"{msg}; its folder is {run_dir}: {go_on}, or start again with another --run-id"
