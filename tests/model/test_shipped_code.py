"""The shipped program (SPEC §7.5, model/run/shipped_code.py): what the scored run executes and nothing
else, minified and packed into one file that runs alone, the same run as train.py bit for bit.

Fast tests build small synthetic programs (tree shaking, annotations, messages, Triton source) and the
repository's own program (its bytes, its parts, no dropped method a framework could call, its modules
import, its kernels run under the interpreter, torch.compile traces its model). The slow ones compile its
Triton kernels for sm_90 to the repository's PTX, and run train.py and the shipped program (copied alone
into an empty folder with the data) on the tiny preset, in one process and under torchrun.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.run import shipped_code as sc

ROOT = Path(__file__).resolve().parents[2]
TARGET_BYTES = 30_000  # issue #22: the shipped program's code bytes (the record's: 20,555)
# The budget today's program must stay within: 36,359 bytes (Python 3.11) once the q/k, residual-norm and
# XSA kernels and the FA4 backend ship, over the target by ~6 KB (issue #22 stays open until it is met).
BUDGET_BYTES = 37_000


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _run_program(program: bytes, cwd: Path, env: dict | None = None, timeout: float = 120):
    """The program alone in ``cwd``, nothing of the repository on sys.path."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "train_gpt.py").write_bytes(program)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run(
        [sys.executable, "train_gpt.py"], cwd=cwd, env={**base, **(env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


SYNTHETIC = {
    "model/__init__.py": '"""The package."""\n',
    "model/submission.py": '''
        """The driver."""
        import json
        from .util import used, Thing, registry
        from . import kernel

        def main(program):
            import inspect, os
            from .lazy import late  # a local import ships too
            out = {
                "used": used(2), "late": late(), "thing": Thing().go(), "registry": sorted(registry),
                "source": inspect.getsource(kernel.kernel), "bytes": os.path.getsize(program),
                "annotations": kernel.op.__annotations__,
            }
            try:
                kernel.check(-1)
            except ValueError as e:
                out["message"] = str(e)
            open("out.json", "w").write(json.dumps(out))
        ''',
    "model/util.py": '''
        """Helpers: some used, some not."""
        registry = []

        def register(fn):
            registry.append(fn.__name__)
            return fn

        @register
        def registered_but_unreferenced():  # a decorator that registers: always ships
            pass

        def used(x: int) -> int:
            """Docstring out."""
            return helper(x) + 1  # comment out

        def helper(x):
            return 10 * x

        def unused_function():
            return "UNUSED_FUNCTION_TEXT"

        UNUSED_CONSTANT = "UNUSED_CONSTANT_TEXT"

        class Thing:
            def go(self):
                return self.inner()

            def inner(self):
                return "went"

            def never_called(self):
                return "NEVER_CALLED_TEXT"
        ''',
    "model/lazy.py": "def late():\n    return 'late'\n",
    "model/kernel.py": """
        from __future__ import annotations

        def jit(fn):
            return fn

        def custom_op(fn):
            return fn

        @jit
        def kernel(x_ptr, n, BLOCK: "constexpr"):
            offsets = x_ptr + n
            return offsets * BLOCK

        @custom_op
        def op(x: int, scale: float) -> int:
            return x

        def plain(x: int) -> int:
            return x

        def check(x):
            if x < 0:
                raise ValueError(f"x must be >= 0, got {x}: THE_MESSAGE_TEXT")
            plain(x)
        """,
    "model/unimported.py": "X = 'NOT_IMPORTED_TEXT'\n",
}


@pytest.mark.parametrize("encoding", sc.ENCODINGS)
def test_a_synthetic_program_keeps_what_runs_and_runs_alone(tmp_path, encoding):
    _write(tmp_path / "repo", SYNTHETIC)
    program, info = sc.build(tmp_path / "repo", encoding)
    assert len(program) == info["code_bytes"] and info["encoding"] == encoding
    if encoding == "base85":
        program.decode("ascii")  # pure ASCII: the file's bytes are its UTF-8 length under any reading
    text = "\x00".join(sc.decode(program))
    for gone in ("UNUSED_FUNCTION_TEXT", "UNUSED_CONSTANT_TEXT", "NEVER_CALLED_TEXT", "NOT_IMPORTED_TEXT",
                 "Docstring out", "comment out", "THE_MESSAGE_TEXT", "The package"):  # fmt: skip
        assert gone not in text, gone
    assert "model.unimported" not in {r.split("\x01")[0] for r in sc.decode(program)}

    proc = _run_program(program, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "run" / "out.json").read_text())
    assert out["used"] == 21 and out["late"] == "late" and out["thing"] == "went"
    assert out["registry"] == ["registered_but_unreferenced"]
    assert out["bytes"] == len(program)
    # Triton's view: real source text, annotations and argument names intact in a jit kernel
    assert out["source"].startswith("@jit\ndef kernel(x_ptr,n,BLOCK:'constexpr'):")
    assert "offsets" in out["source"]  # no name inside a kernel is renamed
    assert out["annotations"] == {"x": "int", "scale": "float", "return": "int"}  # schema inference
    assert out["message"] == ""  # the check stays, its message is train.py's


def test_the_latin1_literal_holds_every_byte(tmp_path):
    data = bytes(range(256)) * 3 + b"\x0012\x00\x00\r\n\\'" + os.urandom(4096)
    path = tmp_path / "lit.py"
    path.write_bytes(f"# coding:l1\nP='{sc._latin1_literal(data)}'\n".encode("latin-1"))
    namespace: dict = {}
    exec(compile(path.read_bytes(), str(path), "exec"), namespace)
    assert namespace["P"].encode("latin-1") == data


def test_the_repository_program():
    program, info = sc.build()
    assert (program, info) == sc.build()  # deterministic
    parts = sc.breakdown()
    assert info["code_bytes"] == len(program) <= BUDGET_BYTES, sc.format_parts(info, parts)
    assert sc.code_size() == info and sc.code_hash() == hashlib.sha256(program).hexdigest()
    files = set(info["files"])
    for path in ("model/pipeline.py", "model/quant.py", "kernels/mlp.py", "optim/muon.py", "model/gpt.py"):
        assert path in files, path
    assert not any(f.startswith(("model/run/", "bench/", "tests/")) or f == "train.py" for f in files)
    for tool in ("model/data/fineweb.py", "model/data/corpus.py", "model/data/__main__.py"):
        assert tool not in files
    assert sum(p["compressed_bytes"] for p in parts) == info["compressed_bytes"]
    assert [p["module"] for p in parts] == [p["module"] for p in info["parts"]]
    assert info["raw_bytes"] > info["shaken_bytes"] > info["minified_bytes"] > info["compressed_bytes"]
    records = dict(r.split("\x01", 1) for r in sc.decode(program))
    assert records == dict(r.split("\x01", 1) for r in sc.decode(sc.build(encoding="base85")[0]))
    for gone in ("def resolve_config", "def _check(", "def audit_run_tables", "def fault_step", "RANGES"):
        assert gone not in "".join(records.values()), gone  # train.py's checks and test hooks


@pytest.mark.xfail(strict=True, reason="issue #22: 36,359 bytes with the new kernels; target 30,000")
def test_the_repository_program_meets_the_target():
    """Visible until it is met: an XPASS (strict) fails this test, the sign to drop the mark."""
    assert sc.build()[1]["code_bytes"] <= TARGET_BYTES


def test_the_command_writes_the_program_and_prints_its_parts(tmp_path, capsys):
    out = tmp_path / "sub" / "train_gpt.py"
    assert sc.main(["--out", str(out)]) == 0
    program, info = sc.build()
    assert out.read_bytes() == program
    text = capsys.readouterr().out
    assert f"wrote {out}: {len(program):,} bytes" in text and f"program: {len(program):,} bytes" in text
    for part in info["parts"]:
        assert part["path"] in text
    with pytest.raises(ValueError, match="encoding"):
        sc.build(encoding="utf-16")


def test_no_dropped_method_is_one_a_base_class_defines():
    """Methods go when no kept code names them; one that overrides a base class's (a framework could call
    it by name) must stay: FRAMEWORK_METHODS has to grow when this fails."""
    import importlib

    shaker = sc._Shaker(sc.load_modules())
    shaker.run(sc.ENTRY, "main")
    dropped = shaker.dropped_methods()
    assert dropped, "nothing dropped: the test proves nothing"
    for qualname, methods in dropped.items():
        module, _, name = qualname.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        for method in methods:
            owners = [base.__qualname__ for base in cls.__mro__[1:] if method in vars(base)]
            assert not owners, f"{qualname}.{method} overrides {owners}"


def test_compare_table():
    rows = {r["compression"]: r for r in sc.compare()}
    shipped = rows["brotli quality 11, window 24 (shipped)"]
    assert shipped["latin1_file"] == sc.code_size()["code_bytes"]
    assert shipped["latin1_file"] < shipped["base85_file"] < shipped["base64_file"]
    assert shipped["stream_bytes"] <= min(r["stream_bytes"] for r in rows.values())


@pytest.mark.interpreter
def test_the_shipped_kernels_compile_from_the_programs_own_text(tmp_path):
    """Every module of the program imports from its own text (served by its importer), the Triton kernels
    as it defines them (minified) run under the interpreter and match the references, and torch.compile
    traces its model in one graph."""
    program, _ = sc.build()
    loader = program.rsplit(b"\n", 2)[0] + b"\n"  # everything but the final `main(__file__)` line
    (tmp_path / "loader.py").write_bytes(loader)
    check = textwrap.dedent(
        """
        import runpy, torch
        runpy.run_path("loader.py")
        import model.submission  # the whole program imports
        import kernels.cross_entropy as ce, kernels.mlp as mlp, inspect
        kernel = mlp._mlp_gemm_kernel  # a JITFunction on a GPU reads this text at decoration time
        source = inspect.getsource(getattr(kernel, "fn", kernel))
        assert mlp.__file__ == "<kernels.mlp>" and source.startswith("@triton.jit"), source[:80]
        assert "tl.constexpr" in source
        torch.manual_seed(0)
        z, t = torch.randn(37, 300) * 8, torch.randint(0, 300, (37,))
        a = ce.softcapped_cross_entropy(z, t, 30.0, "none", impl="triton")
        b = ce.softcapped_cross_entropy_ref(z.double(), t, 30.0, "none")
        assert (a.double() - b).norm() / b.norm() < 1e-5, (a, b)
        x, w = torch.randn(77, 64), torch.randn(128, 64) / 8
        post, _ = mlp.up_act(x, w)
        ref = torch.nn.functional.leaky_relu(x.double() @ w.double().T, 0.5).square()
        assert (post.double() - ref).norm() / ref.norm() < 1e-4
        # torch.compile traces the program's modules (files "<model.gpt>"...) whole: one graph
        from model.config import get_config
        from model.gpt import GPT
        gpt = GPT(get_config("tiny", mlp_impl="torch", ce_impl="torch", attn_impl="sdpa"))
        ids = torch.randint(0, 1024, (2, 64))
        compiled = torch.compile(gpt, backend="eager", fullgraph=True)
        assert torch.equal(compiled(ids, ids), gpt(ids, ids))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


PTX_CHECK = textwrap.dedent(
    """
    import json, runpy, sys
    if sys.argv[1] == "repo":
        sys.path.insert(0, sys.argv[3])
    else:
        runpy.run_path(sys.argv[1])
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    import kernels.cross_entropy as ce, kernels.mlp as mlp
    ce_sig = dict(logits_ptr="*bf16", targets_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32", V="i32",
                  stride_row="i32", softcap="fp32", BLOCK_V="constexpr")
    mlp_sig = dict(a_desc="tensordesc<bf16[128, 64]>", b_desc="tensordesc<bf16[256, 64]>",
                   post_desc="tensordesc<bf16[128, 128]>", out_desc="tensordesc<bf16[128, 128]>",
                   signs_ptr="*i32", M="i32", N="i32", K="i32", n_words="i32", FORWARD="constexpr",
                   BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", NUM_SMS="constexpr",
                   NEG_SCALE="constexpr")
    jobs = {"ce_fwd": (ce._ce_fwd_kernel, ce_sig, {(7,): 1024})}
    for fwd in (True, False):  # the record's H100/H200 tile config
        jobs[f"mlp_{fwd}"] = (mlp._mlp_gemm_kernel, mlp_sig, {(9,): fwd, (10,): 128, (11,): 256, (12,): 64,
                                                             (13,): 132, (14,): 0.25})
    out = {}
    for name, (fn, sig, const) in jobs.items():
        source = ASTSource(fn=fn, signature=sig, constexprs=const)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 128)).asm["ptx"]
        lines = []
        for line in ptx.splitlines():  # the code; the DWARF section after it names the source file
            if "DW_" in line or "Abbrev" in line:
                break
            if not line.strip().startswith((".loc", ".file", "//")):
                lines.append(line)
        out[name] = lines
    json.dump(out, open(sys.argv[2], "w"))
    """
)


@pytest.mark.slow
def test_the_shipped_kernels_compile_to_the_repositorys_ptx(tmp_path):
    """No GPU needed: Triton's front end and the NVIDIA back end compile the Triton kernels for sm_90 (TMA
    included) from the program's own minified text, to the very PTX of the repository's kernels."""
    program, _ = sc.build()
    (tmp_path / "loader.py").write_bytes(program.rsplit(b"\n", 2)[0] + b"\n")
    (tmp_path / "ptx.py").write_text(PTX_CHECK)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    for which in ("loader.py", "repo"):
        cmd = [sys.executable, "ptx.py", which, f"{which}.json", str(ROOT)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = json.loads((tmp_path / "loader.py.json").read_text())
    repo = json.loads((tmp_path / "repo.json").read_text())
    assert shipped.keys() == repo.keys() == {"ce_fwd", "mlp_True", "mlp_False"}
    for name in repo:
        assert len(repo[name]) > 300 and shipped[name] == repo[name], name


# ---------------------------------------------------------------------------------------------------------
# The same run as train.py, alone in an empty folder
# ---------------------------------------------------------------------------------------------------------

# Tiny preset, 20 steps, an evaluation small enough for CI (4,096 validation tokens, one TTT epoch)
RUN_ENV = dict(ITERATIONS="20", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0",
               VAL_MAX_TOKENS="4096", TTT_EPOCHS="1", SEED="7")  # fmt: skip


@pytest.mark.slow
def test_the_shipped_program_is_train_pys_run_bit_for_bit(tmp_path):
    from model.data import default_corpus
    from model.quant import load_artifact
    from model.run_config import model_config, resolve_config
    from model.train_step import build_model
    from tests.test_train import _clean_env, _run

    out = tmp_path / "runs"
    _run([], out, "ref", env=_clean_env(**RUN_ENV))
    run_dir = out / "ref"
    report = json.loads((run_dir / "report.json").read_text())
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    steps = {r["step"]: r["loss"] for r in records if "kind" not in r}

    # the program and the data it needs, alone in an empty folder
    folder = tmp_path / "alone"
    corpus = default_corpus(model_config(resolve_config("tiny", env={}), torch.device("cpu")).vocab_size)
    shutil.copytree(corpus.dataset_dir, folder / "data")
    shutil.copy(corpus.tokenizer_model, folder / "tokenizer.model")
    program, info = sc.build()
    env = {k: v for k, v in _clean_env(**RUN_ENV).items() if k != "PYTHONPATH"}
    env.update(PRESET="tiny", DEVICE="cpu", DATA_PATH="data", TOKENIZER_PATH="tokenizer.model")
    proc = _run_program(program, folder, env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    # the same losses, step by step, bit for bit
    shipped = {}
    for line in lines:
        if line.startswith("step ") and "| loss " in line:
            step = int(line.split()[1].split("/")[0])
            shipped[step] = float(line.split("| loss ")[1].split(" ")[0])
    assert shipped == steps and len(steps) == 20
    # the same artifact, byte for byte, and the code bytes train.py reported are this file's
    assert report["artifact_bytes"]["code"] == len(program) == info["code_bytes"]
    ref_artifact = (run_dir / "final_model.ptz").read_bytes()
    assert (folder / "final_model.ptz").read_bytes() == ref_artifact
    # the same evaluation numbers
    for phase in ("prequant", "quantized", "sliding", "ttt"):
        line = next(x for x in lines if x.startswith(f"{phase}: "))
        loss, bpb = (float(line.split(f"{key} ")[1].split(" ")[0]) for key in ("val_loss", "val_bpb"))
        assert (loss, bpb) == (report["phases"][phase]["val_loss"], report["phases"][phase]["val_bpb"])

    # the artifact it wrote loads and scores (here, through the repository's code)
    from model.data import load_run_data
    from model.evaluate import eval_non_overlapping

    cfg = resolve_config("tiny", env=RUN_ENV)
    model = build_model(cfg, torch.device("cpu"))
    load_artifact(model, folder / "final_model.ptz")
    model.set_looping(True)
    data = load_run_data(cfg, None, model.config.vocab_size, False, lambda m: None)
    r = eval_non_overlapping(model, data.val_tokens, seq_len=cfg.eval_seq_len, batch_seqs=cfg.val_batch_seqs,
                             byte_counter=data.byte_counter)  # fmt: skip
    assert r["val_bpb"] == pytest.approx(report["phases"]["quantized"]["val_bpb"], rel=1e-9)


@pytest.mark.slow
def test_under_torchrun_the_shipped_program_is_train_pys_run(tmp_path):
    """The challenge's launch (torchrun --standalone) on 2 gloo ranks: the shipped program and train.py give
    the same losses, the same artifact bytes and the same evaluations (sliding and TTT: the test above)."""
    from bench.launch import run, torchrun_command
    from model.data import default_corpus
    from tests.test_train import _clean_env, _run

    common = dict(
        ITERATIONS="4", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0", VAL_MAX_TOKENS="4096",
        TTT_ENABLED="0", SLIDING_WINDOW_ENABLED="0", COMPILE="off", ATTN_IMPL="sdpa", OMP_NUM_THREADS="1",
    )  # fmt: skip
    _run([], tmp_path / "runs", "ref", env=_clean_env(**common), torchrun=2, timeout=600)
    run_dir = tmp_path / "runs" / "ref"
    report = json.loads((run_dir / "report.json").read_text())
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    steps = {r["step"]: r["loss"] for r in records if "kind" not in r}

    corpus = default_corpus(report["model_config"]["vocab_size"], progress=False)
    folder = tmp_path / "alone"
    folder.mkdir()
    (folder / "train_gpt.py").write_bytes(sc.build()[0])
    env = {k: v for k, v in _clean_env(**common).items() if k != "PYTHONPATH"}
    env.update(
        PRESET="tiny",
        DEVICE="cpu",
        DATA_PATH=str(corpus.dataset_dir),
        TOKENIZER_PATH=str(corpus.tokenizer_model),
    )
    proc = run(torchrun_command(2, ["train_gpt.py"]), env=env, timeout=600, cwd=folder)
    assert proc.returncode == 0 and not proc.timed_out, proc.tail()
    lines = proc.stdout.splitlines()
    shipped = {int(x.split()[1].split("/")[0]): float(x.split("| loss ")[1].split()[0]) for x in lines
               if x.startswith("step ") and "| loss " in x}  # fmt: skip
    assert shipped == steps and len(steps) == 4
    assert (folder / "final_model.ptz").read_bytes() == (run_dir / "final_model.ptz").read_bytes()
    for phase in ("prequant", "quantized"):
        line = next(x for x in lines if x.startswith(f"{phase}: "))
        assert float(line.split("val_bpb ")[1].split()[0]) == report["phases"][phase]["val_bpb"]
