"""Files are written under a temporary name beside their final one and renamed into place, so a reader
never sees half a file (shards, the artifact, checkpoints, reports, bench results).

The one writer of the repository lives here, in model/, the lowest layer that writes files: model/data,
model/quant, model/run/checkpoint, model/run/report and bench all import it (kernels/ and optim/ write
nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ".<final name>.<mkstemp's 8 random characters>.tmp": what _tmp_path creates and leftover_temporaries finds
_TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _tmp_path(path: Path) -> Path:
    # Same directory (so the rename is atomic), hidden, unique per process and call; mkstemp makes it
    # 0600, give it the permissions a plain open() would.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path beside ``path``, renamed onto it if the block succeeds and removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", newline: str | None = None):
    """Open a temporary file beside ``path``; it is synced and renamed onto ``path`` only if the block
    succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, newline=newline) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj) -> None:
    """Indented JSON (values JSON cannot hold written as strings), atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def leftover_temporaries(root: str | os.PathLike) -> list[Path]:
    """Temporary files under ``root`` that an interrupted write (a kill, a crash) left behind: the block
    of atomic_path never finished, so nothing was renamed and nothing reads them."""
    return sorted(p for p in Path(root).rglob(".*.tmp") if _TMP_NAME.fullmatch(p.name) and p.is_file())


def remove_temporaries(root: str | os.PathLike) -> tuple[int, int]:
    """Remove leftover_temporaries(root); returns (files, bytes) removed. Only for a folder that no other
    process is writing to (train.py holds the run folder's lock)."""
    files = leftover_temporaries(root)
    size = 0
    for p in files:
        size += p.stat().st_size
        p.unlink(missing_ok=True)
    return len(files), size


def folder_blocker(path: str | os.PathLike) -> str | None:
    """Why no folder can be made at ``path`` (None: it is one, or can be made): a file there or on the way,
    or a place this process cannot write. A probe folder is made and removed at once: permissions alone do
    not tell (root, /proc, read-only mounts)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".probe-").cleanup()
    except OSError as exc:
        return f"cannot create a folder in {existing} ({exc.strerror})"
    return None
