"""Shipped code: the files a submission would carry, the single-file bundle they would become, and its
size in bytes (the code part of the 16,000,000-byte cap, SPEC §7.5).

What ships is exactly what a run imports: train.py and every repository module reachable from it
through import statements (function-local ones included; package ``__init__`` files on the way too),
found by reading the sources, never by running them. Tools that a run never imports (the FineWeb
downloader, the corpus builder, the bench suites) cost no bytes.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import lzma
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY = "train.py"


def _module_file(root: Path, name: str) -> Path | None:
    """The file under ``root`` that module ``name`` (dotted) runs from, if it is a repository module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, root: Path) -> set[str]:
    """Dotted names of everything ``path`` imports, each with the packages it passes through."""
    rel = path.relative_to(root).with_suffix("").parts
    package = rel[:-1]  # a package's __init__ and its modules resolve relative imports alike
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import x` imports pkg.x too when x is a submodule
            targets = [module] + [f"{module}.{alias.name}" if module else alias.name for alias in node.names]
        else:
            continue
        for target in filter(None, targets):
            parts = target.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def shipped_files(root: str | os.PathLike = REPO_ROOT) -> list[str]:
    """train.py and the repository modules it imports, transitively, as sorted relative POSIX paths."""
    root = Path(root)
    entry = root / ENTRY
    if not entry.is_file():
        raise FileNotFoundError(f"no {ENTRY} under {root}: nothing ships")
    seen, todo = {entry}, [entry]
    while todo:
        for name in _imported_names(todo.pop(), root):
            path = _module_file(root, name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return sorted(p.relative_to(root).as_posix() for p in seen)


def code_hash(root: str | os.PathLike = REPO_ROOT) -> str:
    """sha256 over the shipped files (the ones counted in the artifact's code bytes)."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in shipped_files(root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


# A minimal self-extracting loader: it writes the bundled files next to itself (real files, so that
# Triton's inspect.getsource works — SPEC §10 item 20) and runs train.py. The bundle is the
# minified sources joined as "path\x01source" records separated by "\x00".
_STUB = (
    "import lzma,base64,os,sys,runpy\n"
    "D=os.path.join(os.path.dirname(os.path.abspath(__file__)),'_golf');sys.path.insert(0,D)\n"
    "for e in lzma.decompress(base64.b85decode(P)).decode().split('\\0'):\n"
    " n,s=e.split('\\1',1);p=os.path.join(D,n);os.makedirs(os.path.dirname(p),exist_ok=True)\n"
    " open(p,'w').write(s)\n"
    "runpy.run_path(os.path.join(D,'train.py'),run_name='__main__')\n"
)


def minify_source(source: str) -> str:
    """Drop docstrings and comments (ast round trip). A body left empty becomes ``pass``."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def build_code_bundle(root: str | os.PathLike = REPO_ROOT) -> tuple[str, dict[str, object]]:
    """The single-file submission the shipped code would become, and its accounting.

    code_bytes = len(UTF-8 of ``P=b'<base85(xz(bundle))>'\\n`` + the loader stub), where bundle =
    "\\x00".join(path + "\\x01" + minify(source)) over the shipped files and xz = LZMA preset 9|extreme.
    Deterministic for a given Python version (ast.unparse formatting). Computed only: our own code is
    never exec-wrapped (that would break Triton, SPEC §10 item 20).
    """
    root = Path(root)
    files = shipped_files(root)
    raw = minified = 0
    records = []
    for rel in files:
        src = (root / rel).read_text(encoding="utf-8")
        mini = minify_source(src)
        raw += len(src.encode())
        minified += len(mini.encode())
        records.append(rel + "\x01" + mini)
    bundle = "\x00".join(records).encode()
    packed = lzma.compress(bundle, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    payload = base64.b85encode(packed).decode("ascii")
    script = f"P=b'{payload}'\n" + _STUB
    info = {
        "files": files,
        "raw_bytes": raw,
        "minified_bytes": minified,
        "lzma_bytes": len(packed),
        "stub_bytes": len(script.encode()) - len(payload),
        "code_bytes": len(script.encode()),
    }
    return script, info


def code_size(root: str | os.PathLike = REPO_ROOT) -> dict[str, object]:
    """:func:`build_code_bundle`'s accounting: files, raw/minified/lzma/stub/code bytes."""
    return build_code_bundle(root)[1]
