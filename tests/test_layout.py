"""The top-level packages run from the repository root and are never installed into site-packages,
so they neither shadow nor are shadowed by PyPI packages of the same names (kernels, optim, model, bench)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "optim", "model", "bench")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_inside_the_repository(name):
    spec = importlib.util.find_spec(name)
    assert spec is not None and Path(spec.origin).resolve().is_relative_to(ROOT), spec


def test_installed_distribution_ships_no_top_level_packages():
    try:
        dist = importlib.metadata.distribution("golfbench")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("golfbench is not pip-installed in this environment")
    shipped = {Path(f).parts[0] for f in dist.files or []}
    assert not shipped & set(PACKAGES), shipped


def test_repository_copy_wins_over_a_same_named_package(tmp_path):
    """A foreign `kernels` package earlier on sys.path must not be picked from the repository root."""
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = "import kernels, sys; print(kernels.__file__)"
    env_path = f"{tmp_path / 'site'}"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": env_path, "PATH": ""},
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(out).resolve().is_relative_to(ROOT), out


def test_the_pins_agree_pyproject_ci_and_readme():
    """`pip install .` and CI install the same Triton and numpy (Triton 3.9 came with `pip install .` while
    CI pinned 3.6), the test extra does not install numpy a second time (it downgraded it), and the README
    names the Triton the kernels are tested with."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {req.split("<")[0].split(">")[0].split("=")[0].strip(): req for req in project["dependencies"]}
    ci = (ROOT / ".ci" / "run").read_text()
    for name in ("triton", "numpy"):
        assert f'"{pins[name]}"' in ci, (name, pins[name])  # .ci/run installs exactly pyproject's pin
    extra = " ".join(project["optional-dependencies"]["test"])
    assert "numpy" not in extra and "triton" not in extra, extra
    assert pins["triton"] == "triton>=3.6,<3.7" and "Triton 3.6" in (ROOT / "README.md").read_text()
