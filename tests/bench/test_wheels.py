"""bench/wheels.py (bench/wheels.sh): the split of a wheel into xz parts, the install from whichever parts
are present, the RECORD check, and the arguments. Small synthetic wheels, xz preset 0: seconds."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import random
import subprocess
import sys
import zipfile

import pytest

from bench import wheels
from bench.env import REPO_ROOT


def make_wheel(path, files: dict[str, bytes], executable=()):
    """A wheel with a real RECORD (sha256 and size of every file), as pip and wheels.verify_record read it."""
    dist, version = path.name.split("-")[:2]
    info = f"{dist}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zi = zipfile.ZipInfo(name, (2026, 10, 13, 6, 34, 0))
            zi.external_attr = (0o755 if name in executable else 0o644) << 16
            zf.writestr(zi, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([name, f"sha256={digest}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return path


@pytest.fixture
def libs_wheel(tmp_path):
    rnd = random.Random(7)
    files = {
        "nvidia_cutlass_dsl/cu13/lib/libbig.so": rnd.randbytes(240_000) + bytes(100_000),
        "nvidia_cutlass_dsl/cu13/include/a.h": b"#pragma once\n",
        "nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_ir.so": rnd.randbytes(90_000),
        "nvidia_cutlass_dsl/cu13/bin/tool": b"#!/bin/sh\necho ok\n",
    }
    return make_wheel(
        tmp_path / "nvidia_cutlass_dsl_libs_cu13-4.8.1-py3-none-any.whl",
        files,
        executable={"nvidia_cutlass_dsl/cu13/bin/tool"},
    ), files


def split(libs_wheel, out):
    return wheels.split_wheel(libs_wheel[0], out, part_mb=0.2, piece_mb=0.05, preset=0)


def test_parts_respect_the_limit_and_hold_every_byte(tmp_path, libs_wheel):
    parts = split(libs_wheel, tmp_path / "libs")
    assert len(parts) >= 2 and [p.name for p in parts] == [
        f"part{i}.tar.xz" for i in range(1, len(parts) + 1)
    ]
    assert all(p.stat().st_size <= 0.2e6 for p in parts)
    state = wheels.unpack_parts(tmp_path / "libs", tmp_path / "stage")
    assert state["complete"] and state["parts"] == len(parts) and not state["waiting"]
    for name, data in libs_wheel[1].items():
        assert (tmp_path / "stage" / name).read_bytes() == data, name
    assert (tmp_path / "stage" / "nvidia_cutlass_dsl/cu13/bin/tool").stat().st_mode & 0o111


def test_install_from_one_part_waits_for_the_rest(tmp_path, libs_wheel):
    parts = split(libs_wheel, tmp_path / "all")
    (tmp_path / "libs").mkdir()
    parts[0].rename(tmp_path / "libs" / parts[0].name)
    state = wheels.unpack_parts(tmp_path / "libs", tmp_path / "stage")
    assert not state["complete"] and state["unpacked"] == [1] and state["parts"] is None
    assert state["waiting"] and all(".piece-" in w for w in state["waiting"])
    for p in parts[1:]:  # the next call carries the rest; part 1 is not unpacked again
        p.rename(tmp_path / "libs" / p.name)
    state = wheels.unpack_parts(tmp_path / "libs", tmp_path / "stage")
    assert state["complete"] and state["unpacked"] == list(range(1, len(parts) + 1))


def test_verify_record_finds_a_changed_or_missing_file(tmp_path, libs_wheel):
    split(libs_wheel, tmp_path / "libs")
    wheels.unpack_parts(tmp_path / "libs", tmp_path / "stage")
    site = tmp_path / "site"
    wheels.merge(tmp_path / "stage", site)
    assert not (site / wheels.MANIFEST_DIR).exists()
    name = libs_wheel[0].name
    assert wheels.verify_record(site, name) == []
    (site / "nvidia_cutlass_dsl/cu13/include/a.h").write_bytes(b"#pragma twice\n")
    (site / "nvidia_cutlass_dsl/cu13/bin/tool").unlink()
    bad = wheels.verify_record(site, name)
    assert len(bad) == 2 and any("a.h: differs" in b for b in bad) and any("tool: missing" in b for b in bad)


def test_install_end_to_end_prints_the_pythonpath(tmp_path, libs_wheel, capsys):
    """Both calls: part 1 alone, then the rest with the other wheels (pip, offline, into --target)."""
    root, site = tmp_path / "whl", tmp_path / "site"
    parts = split(libs_wheel, tmp_path / "all")
    (root / "fa4-libs").mkdir(parents=True)
    parts[0].rename(root / "fa4-libs" / parts[0].name)
    assert wheels.main(["install", str(root), "--site", str(site)]) == 0
    assert "carry the rest" in capsys.readouterr().err
    for p in parts[1:]:
        p.rename(root / "fa4-libs" / p.name)
    (root / "wheels").mkdir()
    make_wheel(
        root / "wheels" / "nvidia_cutlass_dsl_libs_core-4.8.1-py3-none-any.whl",
        {"nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py": b"VERSION = '4.8.1'\n"},
    )
    rc = wheels.main(["install", str(root), "--site", str(site), "--check"])
    out, err = capsys.readouterr()
    assert rc == (1 if "FAILED" in err else 0)  # here flash_attn does not import: no such wheel carried
    assert (
        out
        == f"export PYTHONPATH={site}:{site}/nvidia_cutlass_dsl/dsl_packages${{PYTHONPATH:+:$PYTHONPATH}}\n"
    )
    assert "each as its RECORD says" in err and "import cutlass: ok" in err
    assert (site / "nvidia_cutlass_dsl/cu13/lib/libbig.so").read_bytes() == libs_wheel[1][
        "nvidia_cutlass_dsl/cu13/lib/libbig.so"
    ]
    assert (site / "nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py").is_file()  # pip's, kept beside
    # a second install (the same call repeated) gives the same tree
    assert wheels.main(["install", str(root), "--site", str(site)]) == 0
    assert "already unpacked" in capsys.readouterr().err
    assert wheels.verify_record(site, libs_wheel[0].name) == []


def test_pins_are_the_extras_pins():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {s.split("==")[0].split("[")[0]: s.split("==")[1] for s in (*extras["fa4"], *extras["liger"])}
    carried = {s.split("==")[0]: s.split("==")[1] for s in (*wheels.FA4, *wheels.LIGER, wheels.LIBS)}
    assert {k: carried[k] for k in pins} == pins  # every pin of the extras is the carried version
    assert all(
        v == pins["nvidia-cutlass-dsl"] for k, v in carried.items() if k.startswith("nvidia-cutlass-dsl")
    )


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        wheels.main(["pack", str(tmp_path), "--piece-mb", "50", "--part-mb", "45"])
    assert exc.value.code == 2 and "--piece-mb < --part-mb" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        wheels.main(["pack", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        wheels.main(["install", str(tmp_path / "absent")])
    assert "bash bench/wheels.sh pack" in capsys.readouterr().err
    assert wheels.main(["install", str(tmp_path)]) == 2
    assert "nothing to install" in capsys.readouterr().err
    with pytest.raises(ValueError, match="piece_mb"):
        wheels.split_wheel(tmp_path / "x.whl", tmp_path, part_mb=1, piece_mb=2)


def test_wheels_sh_runs_the_module():
    proc = subprocess.run(
        ["bash", "bench/wheels.sh", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert "pack" in proc.stdout and "install" in proc.stdout
