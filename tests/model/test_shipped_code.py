"""Shipped code (SPEC.md §7.5): exactly the modules a run imports, bundled and counted."""

from __future__ import annotations

import base64
import lzma
import subprocess
import sys

from model.run import shipped_code


def test_code_size_accounting(tmp_path):
    info = shipped_code.code_size()  # the repository's own shipped files
    assert info == shipped_code.code_size()  # deterministic
    assert "model/quant.py" in info["files"] and "kernels/mlp.py" in info["files"]
    assert info["lzma_bytes"] < info["minified_bytes"] < info["raw_bytes"]
    assert info["code_bytes"] < info["raw_bytes"]
    n = info["lzma_bytes"]  # base85 without padding: 5 chars per 4 bytes, k+1 for a k-byte tail
    assert info["code_bytes"] == info["stub_bytes"] + n // 4 * 5 + (n % 4 + 1 if n % 4 else 0)

    # The loader stub really reproduces the (minified) sources and runs train.py.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "util.py").write_text('"""Doc."""\n# comment\nVALUE = 41  # why\n')
    (tmp_path / "train.py").write_text(
        '"""Doc."""\nfrom model.util import VALUE\nopen("marker.txt", "w").write(str(VALUE + 1))\n'
    )
    script, info = shipped_code.build_code_bundle(tmp_path)
    assert info["files"] == ["model/util.py", "train.py"]
    assert info["minified_bytes"] < info["raw_bytes"]
    payload = script.split("'")[1]
    bundle = lzma.decompress(base64.b85decode(payload)).decode()
    assert "VALUE = 41" in bundle and "comment" not in bundle and "Doc." not in bundle
    out = tmp_path / "run"
    out.mkdir()
    (out / "submission.py").write_text(script)
    subprocess.run([sys.executable, "submission.py"], cwd=out, check=True, timeout=60)
    assert (out / "marker.txt").read_text() == "42"
    assert len(script.encode()) == info["code_bytes"]


def test_shipped_files_are_what_train_py_imports(tmp_path):
    files = shipped_code.code_size()["files"]
    # the run's side of model.data ships; the tools it never imports do not
    assert "model/data/__init__.py" in files and "model/data/loader.py" in files
    for tool in ("model/data/fineweb.py", "model/data/corpus.py", "model/data/__main__.py"):
        assert tool not in files, tool
    assert not any(f.startswith(("bench/suites/", "tests/")) for f in files)

    # function-local and relative imports are followed, package __init__ files on the way included
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import leaf\n")
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("from ..helper import X\n")
    (tmp_path / "pkg" / "helper.py").write_text("X = 1\n")
    (tmp_path / "pkg" / "unused.py").write_text("Y = 2\n")
    (tmp_path / "train.py").write_text("import os\n\ndef main():\n    import pkg.sub\n")
    assert shipped_code.shipped_files(tmp_path) == [
        "pkg/__init__.py",
        "pkg/helper.py",
        "pkg/sub/__init__.py",
        "pkg/sub/leaf.py",
        "train.py",
    ]
