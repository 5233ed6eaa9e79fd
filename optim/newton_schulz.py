"""Batched Newton-Schulz orthogonalisation over (B, m, n) stacks, as Muon uses it (SPEC.md section 5.2).

`newton_schulz(G)` maps every matrix of a stack to (roughly) its polar factor U V^T: bf16 operands, fp32
accumulation (cuBLAS bf16 GEMMs accumulate in fp32), 5 quintic iterations by default.

How it differs from the textbook loop in `newton_schulz_ref` (same maths, fewer passes over memory):
* Tall matrices are not transposed in memory: the Gram matrix is taken on the short side (X^T X) and the
  polynomial is applied from the right (X M). cuBLAS reads transposed operands for free.
* Each iteration X <- a X + b A X + c A^2 X (A = X X^T) is run as X <- M X with the small k x k matrix
  M = a I + b A + c A^2 formed in fp32 and rounded once: three plain GEMMs and one small elementwise
  kernel per step, and no pass over the big (m x n) operand besides the GEMMs themselves. (baddbmm with
  beta != 0 copies its (m x n) input into the output first: 90 MB of traffic per step on the MLP banks.)
* The Frobenius normalisation X = U / (||U||_F + eps) is folded into the first step: ||U||_F^2 is the
  trace of the first Gram matrix, so U is never rescaled in memory. A zero matrix stays exactly zero.

`BankedNewtonSchulz` runs NS over several stacks at once (the record's four banks), grouping stacks that
share a shape (tall ones transposed), and on CUDA replays the whole thing as one CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]

QUINTIC: Coefficients = (3.4445, -4.7750, 2.0315)
# Polar Express (PR #1344 -> #1787 -> record #1855): one tuple per iteration (SPEC.md section 5.2).
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
COEFFICIENT_SETS: dict[str, tuple[Coefficients, ...]] = {
    "quintic": (QUINTIC,),
    "polar_express": POLAR_EXPRESS,
}
EPS = 1e-7


def ns_coefficients(coefficients: str | Sequence, steps: int) -> tuple[Coefficients, ...]:
    """The (a, b, c) tuple of each of `steps` iterations.

    `coefficients` is a name in COEFFICIENT_SETS, one (a, b, c) tuple (used at every step) or a sequence
    of tuples; a sequence shorter than `steps` repeats its last tuple (as Polar Express does).
    """
    if steps < 1:
        raise ValueError(f"newton_schulz: steps must be >= 1, got {steps}")
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(
                f"newton_schulz: unknown coefficients {coefficients!r}; use one of "
                f"{sorted(COEFFICIENT_SETS)} or explicit (a, b, c) tuples"
            )
        table = COEFFICIENT_SETS[coefficients]
    else:
        seq = tuple(coefficients)
        if len(seq) == 3 and all(isinstance(v, (int, float)) for v in seq):
            seq = (seq,)
        table = tuple(tuple(float(v) for v in t) for t in seq)
        if not table or any(len(t) != 3 for t in table):
            raise ValueError(f"newton_schulz: coefficients must be (a, b, c) tuples, got {coefficients!r}")
    return tuple(table[min(i, len(table) - 1)] for i in range(steps))


def ns_flops(m: int, n: int, steps: int = 5) -> int:
    """FLOPs of `steps` iterations on one m x n matrix (k = min side): 4 k^2 max + 2 k^3 per step."""
    k, l = min(m, n), max(m, n)
    return steps * (4 * k * k * l + 2 * k**3)


def _ns_stack(U: Tensor, coeffs: tuple[Coefficients, ...], eps: float) -> Tensor:
    """NS on a (B, m, n) stack (cast to bf16 first); see the module docstring for the formulation."""
    U = U.to(torch.bfloat16)
    tall = U.size(-2) > U.size(-1)
    k = min(U.size(-2), U.size(-1))
    eye = torch.eye(k, device=U.device, dtype=torch.float32)

    def gram(X: Tensor) -> Tensor:
        return X.mT @ X if tall else X @ X.mT

    def apply(M: Tensor, X: Tensor) -> Tensor:
        return X @ M if tall else M @ X

    A0 = gram(U)
    # ||U||_F^2 = trace(U U^T); the normalised X0 = U * inv is never materialised.
    inv = 1.0 / (A0.diagonal(dim1=-2, dim2=-1).float().sum(-1).sqrt() + eps)
    inv = inv[:, None, None]
    X = U
    for i, (a, b, c) in enumerate(coeffs):
        if i == 0:
            A = (A0.float() * (inv * inv)).to(torch.bfloat16)
        else:
            A = gram(X)
        AA = A @ A
        M = a * eye + b * A.float() + c * AA.float()
        if i == 0:
            M = M * inv
        X = apply(M.to(torch.bfloat16), X)
    return X


def newton_schulz(
    G: Tensor, steps: int = 5, coefficients: str | Sequence = "quintic", eps: float = EPS
) -> Tensor:
    """Orthogonalise a matrix (m, n) or each matrix of a stack (B, m, n); returns bf16 of G's shape.

    Traceable by torch.compile(fullgraph=True). `coefficients`: "quintic", "polar_express" or explicit
    (a, b, c) tuples (see `ns_coefficients`).
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: G must be (m, n) or (B, m, n), got shape {tuple(G.shape)}")
    coeffs = ns_coefficients(coefficients, steps)
    X = G.to(torch.bfloat16)
    out = _ns_stack(X if G.ndim == 3 else X.unsqueeze(0), coeffs, eps)
    return out if G.ndim == 3 else out.squeeze(0)


def newton_schulz_ref(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence = "quintic",
    eps: float = EPS,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The textbook iteration (SPEC.md 5.2 step 3) in `dtype`: float64 for the truth; bfloat16 gives the
    plain batched-bmm NS that the fast path is measured against. Returns `dtype`."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in ns_coefficients(coefficients, steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs


def compile_static(fn: Callable) -> Callable:
    """torch.compile(fullgraph=True, dynamic=False), with room for one graph per NS group: every group (and
    every instance) shares fn's code object and so its recompile budget, which defaults to 8."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    config = torch._dynamo.config
    limit = {"recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit": 64}

    def run(*args, **kwargs):
        with config.patch(**limit):
            return compiled(*args, **kwargs)

    return run


def cuda_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture fn() (already warmed up: compiled, cuBLAS initialised) as a CUDA graph.

    Returns (graph, fn's return value from the capture, whose tensors are the graph's static outputs).
    Nothing runs during capture: replay the graph to execute it.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def warm_up(fn: Callable[[], object]) -> object:
    """Run fn() once on a side stream (the recipe before capture: lazy cuBLAS/Triton init off the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def run_on_streams(fns: Sequence[Callable[[], object]], streams: Sequence[torch.cuda.Stream] | None) -> list:
    """Run independent pieces of work, each on its own stream (fork/join), or in order when streams is None.

    Inside a CUDA-graph capture the fork/join becomes graph edges, so small NS calls of different banks
    overlap on the GPU instead of each leaving most SMs idle.
    """
    if not streams:
        return [fn() for fn in fns]
    main = torch.cuda.current_stream()
    outs = []
    for fn, stream in zip(fns, streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            outs.append(fn())
    for stream in streams:
        main.wait_stream(stream)
    return outs


def _group_stacks(shapes: Sequence[tuple[int, int, int]], merge: bool) -> list[list[int]]:
    """Indices of the stacks that share one NS call: same (short, long) shape when merging, else singles."""
    if not merge:
        return [[i] for i in range(len(shapes))]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, m, n) in enumerate(shapes):
        groups.setdefault((min(m, n), max(m, n)), []).append(i)
    # Largest work first: on separate streams it starts first and the small groups fill in around it.
    return sorted(groups.values(), key=lambda idx: -sum(math.prod(shapes[i]) for i in idx))


def _ns_group(stacks: list[Tensor], coeffs: tuple[Coefficients, ...], eps: float) -> list[Tensor]:
    """NS of several stacks of one (short, long) shape in one batched call; outputs in input orientation."""
    if len(stacks) == 1:
        return [_ns_stack(stacks[0], coeffs, eps)]
    wide = [s.size(-2) <= s.size(-1) for s in stacks]
    U = torch.cat([(s if w else s.mT).to(torch.bfloat16) for s, w in zip(stacks, wide)])
    X = _ns_stack(U, coeffs, eps)
    outs, off = [], 0
    for s, w in zip(stacks, wide):
        x = X[off : off + s.size(0)]
        outs.append(x if w else x.mT)
        off += s.size(0)
    return outs


class BankedNewtonSchulz:
    """NS over a fixed set of stacks (e.g. the four parameter banks), fast on CUDA.

    The stacks given are the static inputs: write new values into them and call the object; it returns
    the bf16 results (static outputs, overwritten by the next call; tall inputs come back as transposed
    views, as the plain `X.mT` formulation does). Stacks of one (short, long) shape share one batched call
    when `merge` (e.g. 11 MLP-up 2048x512 transposed + 11 MLP-down 512x2048 -> one 22 x 512 x 2048 stack);
    groups run on separate CUDA streams when `streams`. On CUDA each group is torch.compile'd (fusing the
    small elementwise kernels) and the whole call is replayed as one CUDA graph.
    """

    def __init__(
        self,
        stacks: Sequence[Tensor],
        steps: int = 5,
        coefficients: str | Sequence = "quintic",
        *,
        merge: bool = True,
        streams: bool = True,
        eps: float = EPS,
    ):
        self.stacks = [s if s.ndim == 3 else s.unsqueeze(0) for s in stacks]
        self.coeffs = ns_coefficients(coefficients, steps)
        self.eps = eps
        self.groups = _group_stacks([tuple(s.shape) for s in self.stacks], merge)
        self.cuda = all(s.is_cuda for s in self.stacks)
        self.graph = None
        if self.cuda:
            self._fn = compile_static(_ns_group)
            self._streams = (
                [torch.cuda.Stream() for _ in self.groups] if streams and len(self.groups) > 1 else None
            )
        else:
            self._fn = _ns_group

    def _run(self) -> list[Tensor]:
        fns = [
            (lambda idx=idx: self._fn([self.stacks[i] for i in idx], self.coeffs, self.eps))
            for idx in self.groups
        ]
        outs_per_group = run_on_streams(fns, self._streams if self.cuda else None)
        outs: list[Tensor | None] = [None] * len(self.stacks)
        for idx, group_outs in zip(self.groups, outs_per_group):
            for i, out in zip(idx, group_outs):
                outs[i] = out
        return outs

    def __call__(self) -> list[Tensor]:
        if not self.cuda:
            return self._run()
        if self.graph is None:
            warm_up(self._run)
            self.graph, self.outputs = cuda_graph(self._run)
        self.graph.replay()
        return self.outputs
