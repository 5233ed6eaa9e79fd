"""The shipped program: the one file a submission carries (`train_gpt.py`), whose bytes are the code part
of the 16,000,000-byte cap (SPEC §7.5), and what it costs by part (README "The shipped program").

    python -m model.run.shipped_code --out train_gpt.py     # write it; print its bytes by module
    python -m model.run.shipped_code --compare              # the compression / encoding table

What it holds is what the scored run executes, found from the sources (nothing is imported or run):

1. The import closure of the driver `model/submission.py` (the scored pipeline, model/pipeline.py, with
   its default hooks): repository modules only, function-local imports included. train.py, bench/,
   model/run/ (the run machinery) and optim/per_matrix.py (a reference) are not in it.
2. Tree shaking: in each module only the top-level definitions reachable from `main` stay (a name
   used anywhere in kept code keeps its definition; a repository module used other than as
   `alias.attr` keeps all of it; statements that act at import time, such as registering a custom op
   or a try/except import, always stay). A method of a kept class stays when its name is an attribute
   or a string anywhere in kept code, or one that frameworks call (FRAMEWORK_METHODS).
3. Minification by python-minifier (pinned): docstrings, comments, blank lines, local names, the messages
   of checks (BARE_EXCEPTIONS). Annotations go, except in `@triton.jit` kernels (`tl.constexpr`
   parameters and locals) and `torch.library.custom_op` functions (schema inference), and on dataclass
   / NamedTuple fields. Literals are not hoisted and globals are not renamed (a kernel may read only
   constexpr globals; names are observable); argument names never change (keyword calls, `BLOCK=...`),
   and inside a kernel no name does.
4. The modules, as "name\x01source" records joined by "\x00", in one Brotli-11 stream, stored as a
   latin-1 string literal (or base85): a short loader registers a meta-path importer that runs each
   module from its text under the filename "<name>", with that text in `linecache`, so Triton's
   `inspect.getsource` finds real source (SPEC §10 item 20, #1561's approach) and tracebacks show
   lines. Then `model.submission.main(__file__)` runs: `__file__`'s size is the code bytes.

Deterministic for one python-minifier version and one Python minor version (the AST differs between
versions); train.py reports `code_bytes` of exactly this program (`code_size()`), and `code_hash()` is
its sha256 (a checkpoint resumes only under the same shipped program).
"""

from __future__ import annotations

import argparse
import ast
import base64
import functools
import hashlib
import json
import lzma
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY = "model.submission"  # the driver module; its `main(program_path)` is the program's start
PACKAGES = ("kernels", "optim", "model")  # where the scored program's modules live (model/run/ excluded)
# Not in the program: the run machinery, and references that only a non-record configuration selects
# (MUON_IMPL=per_matrix: the shipped program then stops with ModuleNotFoundError naming it).
EXCLUDED = ("model.run", "optim.per_matrix")
ENCODINGS = ("latin1", "base85")  # how the compressed modules sit in the file (README "The shipped program")
BROTLI = dict(quality=11, lgwin=24)  # measured best on minified Python (`--compare`)

# The loader (kept short: every byte counts): P holds the Brotli stream of the records; a meta-path
# importer runs each module from its text, registered in linecache (Triton reads kernel source).
_LOADER = (
    "M=dict(r.split('\\1',1)for r in brotli.decompress({payload}).decode().split('\\0'))\n"
    "class F:\n"
    " def find_spec(s,n,*a):\n"
    "  if n in M:return U.spec_from_loader(n,s,is_package=any(k.startswith(n+'.')for k in M))\n"
    " def create_module(s,m):0\n"
    " def exec_module(s,m):n=m.__name__;f=m.__file__=f'<{{n}}>';S=M[n];"
    "C.cache[f]=len(S),None,S.splitlines(1),f;exec(compile(S,f,'exec'),m.__dict__)\n"
    "sys.meta_path.insert(0,F())\n"
)
_HEAD = {
    "latin1": "# coding:l1\nP='{literal}'\nimport brotli,sys,linecache as C,importlib.util as U\n",
    "base85": "P='{literal}'\nimport brotli,base64,sys,linecache as C,importlib.util as U\n",
}
_PAYLOAD = {"latin1": "P.encode('l1')", "base85": "base64.b85decode(P)"}
_RUN = f"import {ENTRY} as E;E.main(__file__)\n"

# Decorators that only wrap the function they decorate (no registration elsewhere): a definition with
# any other decorator (custom ops, register_fake, ...) always ships.
PURE_DECORATORS = {
    "dataclass",
    "dataclasses.dataclass",
    "functools.cache",
    "functools.lru_cache",
    "functools.wraps",
    "contextlib.contextmanager",
    "torch.no_grad",
    "torch.inference_mode",
    "torch.compile",
    "torch.compiler.assume_constant_result",
    "triton.jit",
    "staticmethod",
    "classmethod",
    "property",
}
KEEP_ANNOTATIONS = ("jit", "custom_op")  # a decorator whose dotted name ends so keeps all annotations
# Methods that frameworks call on a subclass by name (never through an attribute of ours): they stay in
# every kept class. Any other method stays only when its name is an attribute or a string in kept code
# (tests/model/test_shipped_code.py checks that no dropped method overrides one of a base class).
FRAMEWORK_METHODS = {
    "forward", "backward", "setup_context", "jvp", "vmap", "extra_repr", "step", "zero_grad", "state_dict",
    "load_state_dict", "_load_from_state_dict", "_save_to_state_dict", "_apply",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Modules: the import closure
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Module:
    name: str  # dotted
    path: Path
    is_package: bool
    tree: ast.Module
    source: str

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _module_path(root: Path, name: str) -> tuple[Path, bool] | None:
    if not name.startswith(PACKAGES) or name.split(".")[0] not in PACKAGES:
        return None
    if any(name == e or name.startswith(e + ".") for e in EXCLUDED):
        return None
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def _resolve_from(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import`` in ``mod``."""
    if not node.level:
        return node.module or ""
    parts = mod.package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def load_modules(root: str | os.PathLike = REPO_ROOT, entry: str = ENTRY) -> dict[str, Module]:
    """The entry module and every repository module it imports, transitively (package __init__ files on
    the way too), parsed."""
    root = Path(root)
    mods: dict[str, Module] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in mods:
            continue
        found = _module_path(root, name)
        if found is None:
            if name == entry:
                raise FileNotFoundError(f"no module {entry} under {root}: nothing ships")
            continue
        path, is_pkg = found
        source = path.read_text(encoding="utf-8")
        mod = mods[name] = Module(name, path, is_pkg, ast.parse(source, filename=str(path)), source)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
                todo += [".".join(a.name.split(".")[:i]) for a in node.names for i in range(1, 4)]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                todo += [base] + [f"{base}.{a.name}" for a in node.names]
    return mods


# ---------------------------------------------------------------------------------------------------------
# Tree shaking
# ---------------------------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    return None


def _is_definition(stmt: ast.stmt) -> bool:
    """A statement that only binds names (safe to drop when none of them is used)."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return all(_dotted(d) in PURE_DECORATORS for d in stmt.decorator_list)
    if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
        return False  # a compiler directive (string annotations): always stays
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return True
    if isinstance(stmt, ast.Assign | ast.AnnAssign):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return all(isinstance(n, ast.Name | ast.Tuple) for n in targets)
    return False


def _bound_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [stmt.name]
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return [a.asname or a.name.split(".")[0] for a in stmt.names]
    if isinstance(stmt, ast.Assign | ast.AnnAssign):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]


@dataclass
class _Shaker:
    mods: dict[str, Module]
    live: dict[str, set[str]] = field(default_factory=dict)  # module -> live top-level names ("*": all)
    loaded: set[str] = field(default_factory=set)  # modules the program imports
    todo: list[tuple[str, str]] = field(default_factory=list)
    attrs: set[str] = field(default_factory=set)  # attribute names and identifier strings in kept code
    pending: dict[str, list[tuple[str, ast.FunctionDef]]] = field(default_factory=dict)  # method name ->
    kept_methods: set[int] = field(default_factory=set)  # id() of the method definitions that stay

    def __post_init__(self):
        self.stmts = {name: list(m.tree.body) for name, m in self.mods.items()}
        self.binders: dict[str, dict[str, list[ast.stmt]]] = {}
        self.imports: dict[str, dict[str, tuple[str, str | None]]] = {}  # alias -> (module, attr | None)
        for name, mod in self.mods.items():
            by_name: dict[str, list[ast.stmt]] = {}
            aliases: dict[str, tuple[str, str | None]] = {}
            for stmt in self.stmts[name]:
                for bound in _bound_names(stmt):
                    by_name.setdefault(bound, []).append(stmt)
                if isinstance(stmt, ast.Import):
                    for a in stmt.names:
                        target = a.name if a.asname else a.name.split(".")[0]
                        if target in self.mods:
                            aliases[a.asname or target] = (target, None)
                elif isinstance(stmt, ast.ImportFrom):
                    base = _resolve_from(mod, stmt)
                    for a in stmt.names:
                        sub = f"{base}.{a.name}"
                        if sub in self.mods:
                            aliases[a.asname or a.name] = (sub, None)
                        elif base in self.mods:
                            aliases[a.asname or a.name] = (base, a.name)
            self.binders[name], self.imports[name] = by_name, aliases

    # -- marking ------------------------------------------------------------------------------------------

    def use(self, module: str, name: str) -> None:
        if module not in self.mods:
            return
        self.load(module)
        names = self.live.setdefault(module, set())
        if name not in names:
            names.add(name)
            self.todo.append((module, name))

    def load(self, module: str) -> None:
        """``module`` is imported: its parents run first, and its import-time statements always stay."""
        if module in self.loaded or module not in self.mods:
            return
        self.loaded.add(module)
        parts = module.split(".")
        for i in range(1, len(parts)):
            self.load(".".join(parts[:i]))
        for stmt in self.stmts[module]:
            effect = isinstance(stmt, ast.Import | ast.ImportFrom) and self._effectful_import(module, stmt)
            if effect or not _is_definition(stmt):
                self.visit(module, stmt)

    def _effectful_import(self, module: str, stmt: ast.stmt) -> bool:
        """A repository import whose target does something at import time stays even when unused."""
        targets = []
        if isinstance(stmt, ast.Import):
            targets = [a.name for a in stmt.names]
        else:
            base = _resolve_from(self.mods[module], stmt)
            targets = [base] + [f"{base}.{a.name}" for a in stmt.names]
        return any(
            t in self.mods and any(not _is_definition(s) for s in self.stmts[t] if not _docstring(s))
            for t in targets
        )

    def visit_class(self, module: str, node: ast.ClassDef) -> None:
        """A kept class: everything but its methods now; a method once its name is used (or framework's)."""
        for part in [*node.bases, *node.keywords, *node.decorator_list]:
            self.visit(module, part)
        for stmt in node.body:
            if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                self.visit(module, stmt)
            elif stmt.name.startswith("__") or stmt.name in FRAMEWORK_METHODS or stmt.name in self.attrs:
                self.keep_method(module, stmt)
            else:
                self.pending.setdefault(stmt.name, []).append((module, stmt))

    def keep_method(self, module: str, stmt: ast.FunctionDef) -> None:
        if id(stmt) not in self.kept_methods:
            self.kept_methods.add(id(stmt))
            self.visit(module, stmt)

    def attr(self, name: str) -> None:
        if name not in self.attrs:
            self.attrs.add(name)
            for module, stmt in self.pending.pop(name, []):
                self.keep_method(module, stmt)

    def visit(self, module: str, node: ast.AST) -> None:
        """Everything ``node`` (kept code of ``module``) references becomes live."""
        if isinstance(node, ast.ClassDef):
            self.visit_class(module, node)
            return
        aliases = self.imports[module]
        if isinstance(node, ast.Import | ast.ImportFrom):  # the import itself runs its modules
            for mod_name in self._imported_modules(module, node):
                self.load(mod_name)
        for sub in ast.walk(node):
            if sub is not node and isinstance(sub, ast.Import | ast.ImportFrom):
                self._local_import(module, sub)
            if isinstance(sub, ast.ClassDef) and sub is not node:  # a class inside a function: all of it
                for method in sub.body:
                    if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
                        self.kept_methods.add(id(method))
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.isidentifier():
                self.attr(sub.value)  # getattr(obj, "name"), state-dict keys, ...
            if isinstance(sub, ast.Attribute):
                self.attr(sub.attr)
                chain = _dotted(sub)
                if chain and chain.split(".")[0] in aliases:
                    self._use_chain(module, chain)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                self.use(module, sub.id)
            elif isinstance(sub, ast.Global):
                for n in sub.names:
                    self.use(module, n)
            elif isinstance(sub, ast.Call) and _dotted(sub.func) in ("globals", "vars"):
                self.use(module, "*")  # names looked up by string
        # a bare use of a repository-module alias (not as `alias.attr`) keeps all of that module
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id in aliases:
                target, attr = aliases[sub.id]
                if attr is None and not self._only_attribute_base(node, sub):
                    self.use(target, "*")

    def _local_import(self, module: str, node: ast.stmt) -> None:
        """An import inside a function: what it names is used (a module bound by it: all of it)."""
        if isinstance(node, ast.Import):
            for a in node.names:
                self.load(a.name)
                self.use(a.name if a.asname else a.name.split(".")[0], "*")
            return
        base = _resolve_from(self.mods[module], node)
        self.load(base)
        for a in node.names:
            if f"{base}.{a.name}" in self.mods:
                self.load(f"{base}.{a.name}")
                self.use(f"{base}.{a.name}", "*")
            else:
                self.use(base, a.name)

    def _imported_modules(self, module: str, node: ast.stmt) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = _resolve_from(self.mods[module], node)
        return [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in self.mods]

    @staticmethod
    def _only_attribute_base(root: ast.AST, name: ast.Name) -> bool:
        return any(isinstance(sub, ast.Attribute) and sub.value is name for sub in ast.walk(root))

    def _use_chain(self, module: str, chain: str) -> None:
        head, *rest = chain.split(".")
        target, attr = self.imports[module][head]
        if attr is not None:  # `from mod import name`: name.x is an attribute of that object
            self.use(target, attr)
            return
        for part in rest:  # walk submodules as far as they go, then the attribute of the last one
            if f"{target}.{part}" in self.mods:
                target = f"{target}.{part}"
                self.load(target)
                continue
            self.use(target, part)
            return
        self.use(target, "*")

    def run(self, entry: str, name: str) -> None:
        self.use(entry, name)
        while self.todo:
            module, bound = self.todo.pop()
            binders = self.binders[module]
            if bound == "*":
                for stmt in self.stmts[module]:
                    self.visit(module, stmt)
                    for method in stmt.body if isinstance(stmt, ast.ClassDef) else []:
                        if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
                            self.keep_method(module, method)
                    for b in _bound_names(stmt):
                        self.live[module].add(b)
                continue
            if bound not in binders:
                if "__getattr__" in binders:  # a lazy attribute: keep the module's __getattr__
                    self.use(module, "__getattr__")
                continue  # a builtin, or a local name that shadows nothing at module level
            for stmt in binders[bound]:
                self.visit(module, stmt)
                if isinstance(stmt, ast.ImportFrom | ast.Import):
                    self._follow_import(module, stmt, bound)

    def _follow_import(self, module: str, stmt: ast.stmt, bound: str) -> None:
        alias = self.imports[module].get(bound)
        if alias is not None and alias[1] is not None:
            self.use(*alias)

    # -- output -------------------------------------------------------------------------------------------

    def shaken(self, module: str) -> ast.Module:
        live = self.live.get(module, set())
        keep_all = "*" in live
        body = []
        for stmt in self.stmts[module]:
            if keep_all or not _is_definition(stmt):
                body.append(stmt)
                continue
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                names = [a for a in stmt.names if (a.asname or a.name.split(".")[0]) in live]
                if names:
                    copy = ast.Import(names=names) if isinstance(stmt, ast.Import) else None
                    if copy is None:
                        copy = ast.ImportFrom(module=stmt.module, names=names, level=stmt.level)
                    body.append(ast.copy_location(copy, stmt))
                elif self._effectful_import(module, stmt):  # for what it does: the modules, no names
                    targets = [
                        ast.alias(name=m) for m in self._imported_modules(module, stmt) if m in self.mods
                    ]
                    body.append(ast.copy_location(ast.Import(names=targets), stmt))
            elif set(_bound_names(stmt)) & live:
                body.append(self._without_dropped_methods(stmt))
        return ast.Module(body=body, type_ignores=[])

    def _without_dropped_methods(self, stmt: ast.stmt) -> ast.stmt:
        if not isinstance(stmt, ast.ClassDef):
            return stmt
        body = [
            b
            for b in stmt.body
            if not isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef) or id(b) in self.kept_methods
        ]
        return ast.copy_location(
            ast.ClassDef(stmt.name, stmt.bases, stmt.keywords, body or [ast.Pass()], stmt.decorator_list),
            stmt,
        )

    def dropped_methods(self) -> dict[str, list[str]]:
        """Per kept class ("module.Class"), the methods that do not ship."""
        out = {}
        for module, names in self.live.items():
            for stmt in self.stmts[module]:
                if isinstance(stmt, ast.ClassDef) and ("*" in names or stmt.name in names):
                    dropped = [
                        b.name
                        for b in stmt.body
                        if isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)
                        and id(b) not in self.kept_methods
                    ]
                    if dropped:
                        out[f"{module}.{stmt.name}"] = dropped
        return out


def _docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and "__name__" in ast.unparse(stmt.test)
        and "__main__" in ast.unparse(stmt.test)
    )


# Exceptions whose message the shipped program leaves out: the check and the exception's type stay, the
# text (train.py's, which checks every input before the same code runs) does not. Never SystemExit (its
# message is its exit status) nor a class with its own __init__.
BARE_EXCEPTIONS = {
    "ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "NotImplementedError",
    "FileNotFoundError", "AssertionError",
}  # fmt: skip


def _protected(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function whose annotations are read at run time: Triton kernels, custom ops."""
    return any((_dotted(d) or "").endswith(KEEP_ANNOTATIONS) for d in node.decorator_list)


class _Unannotate(ast.NodeTransformer):
    """Annotations out, except in protected functions (all of theirs: `HALF_N: tl.constexpr = ...` makes a
    constexpr inside a kernel) and on class-level fields (dataclass, NamedTuple)."""

    def visit_FunctionDef(self, node):
        if _protected(node):
            return node
        node.returns = None
        args = node.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None:
                a.annotation = None
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        node.body = [b if isinstance(b, ast.AnnAssign) else self.visit(b) for b in node.body]
        return node

    def visit_AnnAssign(self, node):
        if node.value is None:  # a bare `x: T` in a function makes x local: it stays
            return node
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def _strip(tree: ast.Module, bare: set[str] = frozenset()) -> tuple[ast.Module, set[str]]:
    """Docstrings, `if __name__ == "__main__"` blocks, annotations (except where they are read at run
    time) and the messages of ``bare`` exceptions out; returns the names that must not be renamed
    (Triton kernels' own)."""
    tree.body = [s for s in tree.body if not _is_main_guard(s)]
    frozen: set[str] = set()
    for node in ast.walk(tree):
        call = node.exc if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) else None
        if call is not None and isinstance(call.func, ast.Name) and call.func.id in bare:
            node.exc = call.func
        scope = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        if scope and node.body and _docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
        jit = isinstance(node, ast.FunctionDef) and any(
            (_dotted(d) or "").endswith("jit") for d in node.decorator_list
        )
        if jit:  # Triton reads the kernel's text: no name in it changes
            frozen |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            frozen |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
    tree = _Unannotate().visit(tree)
    if not _annotated(tree):  # string annotations change nothing where none is left
        tree.body = [s for s in tree.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    return tree, frozen


def _annotated(tree: ast.Module) -> bool:
    """Any annotation left: arguments, returns, fields, variables (in protected functions)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            return True
        if isinstance(node, ast.AnnAssign):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------------------


def _minify(source: str, frozen: set[str]) -> str:
    try:
        import python_minifier
    except ImportError:
        raise SystemExit(
            "python-minifier is not installed: the code bytes of the cap are the shipped program's, which "
            "it builds; pip install python-minifier==3.4.0 (a dependency in pyproject.toml)"
        ) from None

    options = python_minifier.RemoveAnnotationsOptions(  # all done by _strip, where it is safe
        remove_variable_annotations=False,
        remove_return_annotations=False,
        remove_argument_annotations=False,
        remove_class_attribute_annotations=False,
    )
    return python_minifier.minify(
        source,
        remove_annotations=options,
        remove_literal_statements=True,
        hoist_literals=False,
        rename_locals=True,
        preserve_locals=sorted(frozen),
        rename_globals=False,
    )


@dataclass
class Part:
    module: str
    path: str  # relative POSIX path
    raw_bytes: int  # the source file
    shaken_bytes: int  # after tree shaking (ast.unparse, docstrings and annotations out)
    minified_bytes: int
    compressed_bytes: int | None = None  # what it adds to the Brotli stream (breakdown())


def _stat_key(root: Path) -> tuple:
    files = sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def build(root: str | os.PathLike = REPO_ROOT, encoding: str = "latin1") -> tuple[bytes, dict]:
    """The shipped program (the file's bytes) and its accounting: parts by module, totals, loader bytes."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    root = Path(root).resolve()
    return _build(root, _stat_key(root), encoding)


def bundle(root: str | os.PathLike = REPO_ROOT) -> tuple[list[str], list[Part]]:
    """The minified modules as "name\x01source" records, in load order, and their parts."""
    root = Path(root).resolve()
    return _bundle(root, _stat_key(root))


def _content_key(root: Path) -> str:
    """sha256 of what the bundle is made from: every source file of the packages, this builder, the
    minifier's and Python's versions (the disk cache's key)."""
    h = hashlib.sha256(f"{_minifier_version()}|{sys.version_info[:2]}".encode())
    h.update(Path(__file__).read_bytes())
    for path in sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _bundle(root: Path, _key: tuple) -> tuple[list[str], list[Part]]:
    """Cached on disk by content (<cache>/shipped/<key>.json): every train.py run reports the code bytes,
    and minifying takes seconds."""
    from ..data.paths import default_cache_dir

    cache = default_cache_dir() / "shipped" / f"{_content_key(root)}.json"
    try:
        saved = json.loads(cache.read_text(encoding="utf-8"))
        return saved["records"], [Part(**p) for p in saved["parts"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records, parts = _make_bundle(root)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache, "w") as f:
            json.dump({"records": records, "parts": [p.__dict__ for p in parts]}, f)
    except OSError:  # a read-only cache costs time, not correctness
        pass
    return records, parts


def _make_bundle(root: Path) -> tuple[list[str], list[Part]]:
    mods = load_modules(root)
    shaker = _Shaker(mods)
    shaker.run(ENTRY, "main")
    parts: list[Part] = []
    records: list[str] = []
    bare = BARE_EXCEPTIONS | _plain_exceptions(mods)
    for name in sorted(shaker.loaded, key=lambda n: (n.split(".")[0], n)):
        mod = mods[name]
        tree, frozen = _strip(shaker.shaken(name), bare)
        shaken = ast.unparse(tree)
        mini = _minify(shaken, frozen) if shaken.strip() else ""
        if "\x00" in mini or "\x01" in mini:
            raise ValueError(f"{mod.path}: a NUL or \\x01 character in the source (the record separators)")
        rel = mod.path.relative_to(root).as_posix()
        parts.append(Part(name, rel, len(mod.source.encode()), len(shaken.encode()), len(mini.encode())))
        records.append(f"{name}\x01{mini}")
    return records, parts


def breakdown(root: str | os.PathLike = REPO_ROOT) -> list[dict]:
    """The parts with what each adds to the Brotli stream: the stream of each growing prefix of the
    bundle, differenced (so the parts sum to the stream; a module late in the bundle profits from
    the ones before it)."""
    records, parts = bundle(root)
    out, previous = [], 0
    for i, part in enumerate(parts):
        size = len(_compress("\x00".join(records[: i + 1]).encode()))
        out.append({**part.__dict__, "compressed_bytes": size - previous})
        previous = size
    return out


def _plain_exceptions(mods: dict[str, Module]) -> set[str]:
    """Our exception classes that derive from a BARE_EXCEPTIONS class and add no __init__ (message only)."""
    out: set[str] = set()
    for mod in mods.values():
        for stmt in mod.tree.body:
            if not isinstance(stmt, ast.ClassDef) or not any(
                _dotted(b) in BARE_EXCEPTIONS for b in stmt.bases
            ):
                continue
            if not any(isinstance(b, ast.FunctionDef) and b.name == "__init__" for b in stmt.body):
                out.add(stmt.name)
    return out


def _compress(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, **BROTLI)


def encode(stream: bytes, encoding: str) -> bytes:
    """The program's file: the loader around ``stream`` (the compressed records) in ``encoding``."""
    if encoding == "latin1":
        literal = _latin1_literal(stream)
    else:
        literal = base64.b85encode(stream).decode("ascii")
    text = _HEAD[encoding].format(literal=literal) + _LOADER.format(payload=_PAYLOAD[encoding]) + _RUN
    return text.encode("latin-1" if encoding == "latin1" else "ascii")


def decode(program: bytes) -> list[str]:
    """The records of a program written by :func:`encode` (tests and `--compare`)."""
    import brotli

    if program.startswith(b"# coding:l1\n"):
        literal = ast.literal_eval(program.decode("latin-1").split("\n")[1][2:])
        stream = literal.encode("latin-1")
    else:
        stream = base64.b85decode(program.split(b"'")[1])
    return brotli.decompress(stream).decode().split("\x00")


@functools.lru_cache(maxsize=8)
def _build(root: Path, key: tuple, encoding: str) -> tuple[bytes, dict]:
    records, parts = _bundle(root, key)
    packed = _compress("\x00".join(records).encode())
    program = encode(packed, encoding)
    info = {
        "files": [p.path for p in parts],
        "parts": [p.__dict__ for p in parts],
        "raw_bytes": sum(p.raw_bytes for p in parts),
        "shaken_bytes": sum(p.shaken_bytes for p in parts),
        "minified_bytes": sum(len(r.encode()) for r in records) + len(records) - 1,
        "compressed_bytes": len(packed),
        "encoding": encoding,
        "loader_bytes": len(encode(b"", encoding)),
        "code_bytes": len(program),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "minifier": _minifier_version(),
    }
    return program, info


def _minifier_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("python-minifier")
    except PackageNotFoundError:
        return "not installed"  # _minify says what to do


def code_size(root: str | os.PathLike = REPO_ROOT) -> dict:
    """:func:`build`'s accounting: files, parts; raw, shaken, minified, compressed, loader and code bytes."""
    return build(root)[1]


def code_hash(root: str | os.PathLike = REPO_ROOT) -> str:
    """sha256 of the shipped program (a checkpoint resumes only under the same one)."""
    return hashlib.sha256(build(root)[0]).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Compression and encodings, measured (README "The shipped program")
# ---------------------------------------------------------------------------------------------------------


def _latin1_literal(data: bytes) -> str:
    """The body of a '...' literal of a latin-1 source file that holds ``data`` (as str code points):
    the byte itself, except NUL, CR, LF, quote and backslash (escaped)."""
    out = []
    for i, b in enumerate(data):
        if b == 0:
            nxt = data[i + 1] if i + 1 < len(data) else 0
            out.append("\\x00" if 48 <= nxt <= 55 else "\\0")  # \0 before an octal digit would read on
        elif b in (10, 13):
            out.append("\\n" if b == 10 else "\\r")
        elif b in (39, 92):
            out.append("\\" + chr(b))
        else:
            out.append(chr(b))
    return "".join(out)


def compare(root: str | os.PathLike = REPO_ROOT) -> list[dict]:
    """Every compressor and text encoding on the minified bundle: the compressed stream's bytes and the
    whole file's (the loader adjusted to each: the file's bytes are what the challenge counts)."""
    import brotli

    records, _ = bundle(root)
    data = "\x00".join(records).encode()
    raw_lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    tuned = [{**raw_lzma2[0], "lc": 3, "lp": 0, "pb": 0}]
    streams = {
        "zlib level 9": (zlib.compress(data, 9), 8),
        "xz preset 6": (lzma.compress(data, preset=6), 0),
        "xz preset 9 extreme": (lzma.compress(data, preset=9 | lzma.PRESET_EXTREME), 0),
        "raw LZMA2 preset 9 extreme": (lzma.compress(data, lzma.FORMAT_RAW, filters=raw_lzma2), 44),
        "raw LZMA2 9e, lc3 lp0 pb0": (lzma.compress(data, lzma.FORMAT_RAW, filters=tuned), 44),
        "brotli quality 11, window 22": (brotli.compress(data, quality=11), 0),
        "brotli quality 11, window 24 (shipped)": (_compress(data), 0),
    }
    rows = []
    for name, (stream, extra_loader) in streams.items():  # extra: the raw formats' filter arguments
        row = {"compression": name, "stream_bytes": len(stream)}
        for enc, key in (("base64", "base64_file"), ("base85", "base85_file"), ("latin1", "latin1_file")):
            text_bytes = len(base64.b64encode(stream)) if enc == "base64" else None
            if text_bytes is None:
                row[key] = len(encode(stream, enc)) + extra_loader
            else:
                row[key] = len(encode(b"", "base85")) + text_bytes + extra_loader
        rows.append(row)
    return rows


def format_parts(info: dict, parts: list[dict]) -> str:
    """The table `python -m model.run.shipped_code` prints (``parts``: :func:`breakdown`)."""
    lines = [f"{'module':24s} {'file':28s} {'raw':>8s} {'shaken':>8s} {'minified':>9s} {'brotli':>7s}"]
    for p in parts:
        lines.append(
            f"{p['module']:24s} {p['path']:28s} {p['raw_bytes']:8,d} {p['shaken_bytes']:8,d} "
            f"{p['minified_bytes']:9,d} {p['compressed_bytes']:7,d}"
        )
    lines.append(
        f"{'total':24s} {str(len(info['parts'])) + ' modules':28s} {info['raw_bytes']:8,d} "
        f"{info['shaken_bytes']:8,d} {info['minified_bytes']:9,d} {info['compressed_bytes']:7,d}"
    )
    lines.append(
        f"program: {info['code_bytes']:,} bytes = {info['compressed_bytes']:,} Brotli bytes as "
        f"{info['encoding']} + the loader ({info['loader_bytes']:,} bytes); Python {info['python']}, "
        f"python-minifier {info['minifier']}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the shipped program and print its bytes by part.")
    p.add_argument("--out", default=None, help="write the program here (e.g. train_gpt.py)")
    p.add_argument("--encoding", default="latin1", choices=ENCODINGS)
    p.add_argument("--compare", action="store_true", help="also print the compression / encoding table")
    args = p.parse_args(argv)
    program, info = build(encoding=args.encoding)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(program)
        print(f"wrote {args.out}: {len(program):,} bytes")
    print(format_parts(info, breakdown()))
    if args.compare:
        print(f"\n{'compression':40s} {'stream':>8s} {'base64':>8s} {'base85':>8s} {'latin-1':>8s}")
        for r in compare():
            print(
                f"{r['compression']:40s} {r['stream_bytes']:8,d} {r['base64_file']:8,d} "
                f"{r['base85_file']:8,d} {r['latin1_file']:8,d}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
