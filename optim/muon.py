"""Muon over 2-D parameters and 3-D parameter banks, single-process or sharded across ranks (SPEC.md 5.2-5.3).

Per matrix (every slice of a bank), with momentum mu, learning rate lr, weight decay wd:

    buf <- mu * buf + G                      (G averaged over ranks)
    U   <- G + mu * buf  (Nesterov)  or buf
    U   <- U / max(||row||_2, 1e-7)          (MuonEq-R row normalisation, fp32; on by default)
    X   <- NewtonSchulz(U)                    (bf16, 5 steps)
    W   <- W * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * X

Each bank is one batched NS call; in the sharded path, banks whose matrices share a shape after
transposing the tall ones (MLP up 2048x512 and down 512x2048) share one. On CUDA the per-group maths is
torch.compile'd and the step is replayed as a CUDA graph (learning rate, momentum and decay live in a
device tensor written before each replay, so schedules do not recapture); graphs are keyed by the
addresses they read and recaptured when those change (e.g. `zero_grad(set_to_none=True)` handing back
gradients at new addresses).

Sharded ("parallel") Muon runs when torch.distributed is initialised with more than one rank. Each bank's
leading dim is padded to a multiple of the world size W; each rank owns `padded / W` matrices:

    launch_reduce_scatters()   grad -> bf16 padded buffer -> async reduce-scatter (AVG), largest bank first
    ... the caller steps AdamW here, overlapping the reduce-scatters ...
    step()                     per NS group: wait its reduce-scatters, momentum/row-norm/NS on the local
                               shard, async all-gather of the update; then apply the previous group's
                               update, so each all-gather overlaps the next group's NS

`step()` launches the reduce-scatters itself when the caller did not. It expects each rank's local,
un-averaged gradients. Every momentum buffer (the shard buffers included) is `optimizer.state`, so
`state_dict()` / `load_state_dict()` round-trip it and restoring a snapshot resets it (SPEC 10 item 12).
In the sharded case a rank's state holds its own shard, so a state dict loads back at the same world size.

Over 500 lines on purpose: the plan, the CUDA-graphed single-process step and the sharded step all work
on one Muon instance's state (plan, buffers, graphs) and are read together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import rank_world
from .newton_schulz import (
    EPS,
    _ns_stack,
    compile_static,
    cuda_graph,
    ns_coefficients,
    run_on_streams,
    warm_up,
)

ROW_NORM_EPS = 1e-7
_MAX_GRAPHS = 16
_HYPER_RING = 4


class _Hyper(NamedTuple):
    """One member's row of h, the (members, 4) fp32 device tensor the (graphed) step reads its
    hyper-parameters from; the field order is the column order."""

    momentum: float
    grad_scale: float
    decay: float  # 1 - lr * wd
    step: float  # -lr * scale


# Column numbers of h, as plain ints so that compiled code indexes h with constants.
_MOMENTUM = _Hyper._fields.index("momentum")
_GRAD_SCALE = _Hyper._fields.index("grad_scale")
_DECAY = _Hyper._fields.index("decay")
_STEP = _Hyper._fields.index("step")


# ---------------------------------------------------------------------------------------------------------
# The maths of one NS group (traceable by torch.compile(fullgraph=True)); h: see _Hyper.


def _prepare(grads, bufs, h, rows, transpose, nesterov, row_normalize, coeffs, eps):
    """Momentum, Nesterov and row normalisation of each member, stacked (tall ones transposed when the
    group mixes orientations), then Newton-Schulz. Updates `bufs` in place; returns the bf16 NS stack."""
    stack = []
    for g, buf, r, t in zip(grads, bufs, rows, transpose):
        mu = h[r, _MOMENTUM]
        g = g.float() * h[r, _GRAD_SCALE]
        buf.copy_(buf.float() * mu + g)
        u = g + mu * buf.float() if nesterov else buf.float()
        if row_normalize:
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)
        if u.ndim == 2:
            u = u.unsqueeze(0)
        stack.append(u.mT if t else u)
    # Stacked in fp32 and cast inside _ns_stack: compiled, the cast fuses into this prologue's kernel.
    return _ns_stack(torch.cat(stack) if len(stack) > 1 else stack[0], coeffs, eps)


def _apply(params, updates, h, rows, transpose):
    """W <- W * (1 - lr * wd) - lr * scale * X, with X back in the parameter's orientation."""
    for p, x, r, t in zip(params, updates, rows, transpose):
        x = (x.mT if t else x).reshape(p.shape)
        p.copy_(p * h[r, _DECAY] + x.float() * h[r, _STEP])


def _single_step(params, grads, bufs, h, rows, transpose, nesterov, row_normalize, coeffs, eps):
    X = _prepare(grads, bufs, h, rows, transpose, nesterov, row_normalize, coeffs, eps)
    updates, off = [], 0
    for p in params:
        b = p.size(0) if p.ndim == 3 else 1
        updates.append(X[off : off + b])
        off += b
    _apply(params, updates, h, rows, transpose)


# ---------------------------------------------------------------------------------------------------------
# Plan: which parameters share an NS call, and the communication buffers of the sharded path.


@dataclass
class _Member:
    p: Tensor
    row: int  # row in the hyper-parameter tensor
    group_index: int  # index into Muon.param_groups
    transpose: bool  # stacked transposed in its NS group
    scale: float
    batch: int  # matrices in the parameter (1 for 2-D)
    # sharded path only
    shard: int = 0
    send: Tensor | None = None
    recv: Tensor | None = None
    gathered: Tensor | None = None
    rs_work: object = None
    ag_work: object = None


@dataclass
class _Group:
    members: list[_Member]
    nesterov: bool
    row_normalize: bool
    coeffs: tuple
    offsets: list[int] = field(default_factory=list)  # sharded: each member's first row in the NS stack

    def statics(self):
        rows = tuple(m.row for m in self.members)
        transpose = tuple(m.transpose for m in self.members)
        return rows, transpose, self.nesterov, self.row_normalize, self.coeffs, EPS


@dataclass
class _Plan:
    signature: tuple
    members: list[_Member]
    groups: list[_Group]
    h: Tensor
    world: int
    rank: int
    process_group: object
    rs_op: object = None
    grad_scale: float = 1.0
    hyper_rows: list | None = None  # the values last written into h
    hyper_ring: list = field(default_factory=list)
    hyper_slot: int = 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters and 3-D banks (B, rows, cols); see the module docstring.

    momentum can be changed before any step through `param_groups[i]["momentum"]` (the 0.92 -> 0.97 warmup).
    With `row_normalize=False` the update equals `torch.optim.Muon` applied to each slice.
    momentum_dtype: the momentum buffers' dtype (bf16 as in the record, SPEC 10 item 5).
    cuda_graph: on CUDA, torch.compile the per-group maths and replay the step as CUDA graphs
    (False: eager kernels, for debugging and as the reference of the fast path).
    streams: run independent NS groups on separate CUDA streams (single-process path).
    process_group: the ranks to shard over (default: the world, when torch.distributed is initialised).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.97,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        row_normalize: bool = True,
        coefficients: str | Sequence = "quintic",
        *,
        momentum_dtype: torch.dtype = torch.bfloat16,
        cuda_graph: bool = True,
        streams: bool = True,
        process_group=None,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"Muon: lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})"
            )
        ns_coefficients(coefficients, ns_steps)  # validates
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            row_normalize=row_normalize,
            coefficients=coefficients,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"Muon: parameters must be 2-D matrices or 3-D banks, got {tuple(p.shape)}"
                    )
        self.momentum_dtype = momentum_dtype
        self.use_cuda_graph = cuda_graph
        self.use_streams = streams
        self.process_group = process_group
        self._plan: _Plan | None = None
        self._rs_pending = False
        self._graphs: dict = {}
        self._warm: set = set()
        self._compiled: dict = {}
        self._streams: list | None = None

    # ----- plan -------------------------------------------------------------------------------------------

    def _signature(self) -> tuple:
        groups = tuple(
            (
                tuple(id(p) for p in g["params"]),
                g["nesterov"],
                g["row_normalize"],
                ns_coefficients(g["coefficients"], g["ns_steps"]),
            )
            for g in self.param_groups
        )
        return groups, rank_world(self.process_group)

    def _get_plan(self) -> _Plan:
        signature = self._signature()
        if self._plan is not None and self._plan.signature == signature:
            return self._plan
        rank, world = rank_world(self.process_group)
        members: list[_Member] = []
        keyed: dict[tuple, list[_Member]] = {}
        for gi, group in enumerate(self.param_groups):
            coeffs = ns_coefficients(group["coefficients"], group["ns_steps"])
            for p in group["params"]:
                rows, cols = p.shape[-2:]
                m = _Member(
                    p=p,
                    row=len(members),
                    group_index=gi,
                    transpose=False,
                    scale=math.sqrt(max(1.0, rows / cols)),
                    batch=p.size(0) if p.ndim == 3 else 1,
                )
                members.append(m)
                # Sharded: one NS call per (short, long) shape, MLP up transposed into MLP down's stack
                # (per-rank shards are tiny; merging them cut NS time by a quarter). One GPU: one call per
                # bank, each on its own stream (transposing the whole up bank costs more than merging saves).
                shape = (min(rows, cols), max(rows, cols)) if world > 1 else (rows, cols)
                key = (shape, p.device, group["nesterov"], group["row_normalize"], coeffs)
                keyed.setdefault(key, []).append(m)
        groups = []
        for key, ms in keyed.items():
            tall = [m.p.size(-2) > m.p.size(-1) for m in ms]
            if any(tall) and not all(tall):  # mixed orientations: stack the tall ones transposed
                for m, t in zip(ms, tall):
                    m.transpose = t
            groups.append(_Group(ms, nesterov=key[2], row_normalize=key[3], coeffs=key[4]))
        # Largest first: its reduce-scatter is launched first and its NS starts first.
        groups.sort(key=lambda g: -sum(m.p.numel() for m in g.members))
        device = members[0].p.device if members else torch.device("cpu")
        plan = _Plan(
            signature=signature,
            members=members,
            groups=groups,
            h=torch.zeros(len(members), len(_Hyper._fields), dtype=torch.float32, device=device),
            world=world,
            rank=rank,
            process_group=self.process_group,
        )
        if plan.sharded:
            self._build_shards(plan)
        self._plan = plan
        self._graphs.clear()
        self._rs_pending = False
        return plan

    def _build_shards(self, plan: _Plan) -> None:
        backend = dist.get_backend(plan.process_group)
        # NCCL averages in the collective (as the record does); elsewhere sum and fold 1/W into the step.
        if backend == "nccl":
            plan.rs_op = dist.ReduceOp.AVG
        else:
            plan.rs_op, plan.grad_scale = dist.ReduceOp.SUM, 1.0 / plan.world
        for m in plan.members:
            rows, cols = m.p.shape[-2:]
            padded = -(-m.batch // plan.world) * plan.world
            m.shard = padded // plan.world
            kw = dict(dtype=torch.bfloat16, device=m.p.device)
            m.send = torch.zeros(padded, rows, cols, **kw)  # padding matrices stay zero
            m.recv = torch.zeros(m.shard, rows, cols, **kw)
            m.gathered = torch.zeros(padded, *((cols, rows) if m.transpose else (rows, cols)), **kw)
        for g in plan.groups:
            g.offsets, off = [], 0
            for m in g.members:
                g.offsets.append(off)
                off += m.shard

    def _momentum_shape(self, p: Tensor, plan: _Plan) -> tuple[int, ...]:
        if not plan.sharded:
            return tuple(p.shape)
        batch = p.size(0) if p.ndim == 3 else 1
        return (-(-batch // plan.world), *p.shape[-2:])

    def _buffer(self, m: _Member, plan: _Plan) -> Tensor:
        state = self.state[m.p]
        if "momentum_buffer" not in state:
            shape = self._momentum_shape(m.p, plan)
            state["momentum_buffer"] = torch.zeros(shape, dtype=self.momentum_dtype, device=m.p.device)
        return state["momentum_buffer"]

    def _write_hyper(self, plan: _Plan) -> None:
        """Write each member's _Hyper row into h, which the (graphed) step reads; skipped when unchanged.
        This runs every step, so it stays cheap on the host: a small ring of pinned buffers, each reused
        only after its previous copy finished (no host sync)."""
        rows = []
        for m in plan.members:
            g = self.param_groups[m.group_index]
            lr = float(g["lr"])
            rows.append(
                _Hyper(
                    momentum=float(g["momentum"]),
                    grad_scale=plan.grad_scale,
                    decay=1.0 - lr * g["weight_decay"],
                    step=-lr * m.scale,
                )
            )
        if rows == plan.hyper_rows:
            return
        plan.hyper_rows = rows
        if not plan.h.is_cuda:
            plan.h.copy_(torch.tensor(rows, dtype=torch.float32))
            return
        if not plan.hyper_ring:
            plan.hyper_ring = [
                (torch.empty(plan.h.shape, dtype=torch.float32, pin_memory=True), torch.cuda.Event())
                for _ in range(_HYPER_RING)
            ]
        plan.hyper_slot = (plan.hyper_slot + 1) % len(plan.hyper_ring)
        host, done = plan.hyper_ring[plan.hyper_slot]
        done.synchronize()  # the copy from this slot _HYPER_RING writes ago (long finished in practice)
        host.numpy()[:] = rows
        plan.h.copy_(host, non_blocking=True)
        done.record()

    # ----- fast path plumbing -----------------------------------------------------------------------------

    def _fast(self, plan: _Plan) -> bool:
        return self.use_cuda_graph and plan.h.is_cuda

    def _fn(self, name: str, plan: _Plan):
        fn = {"single": _single_step, "prepare": _prepare, "apply": _apply}[name]
        if not self._fast(plan):
            return fn
        if name not in self._compiled:
            self._compiled[name] = compile_static(fn)
        return self._compiled[name]

    def _run(self, name: str, key: tuple, fn):
        """Run fn eagerly, or as a CUDA graph keyed by `key` (the addresses it reads and writes)."""
        plan = self._plan
        if not self._fast(plan):
            return fn()
        entry = self._graphs.get((name, key))
        if entry is None:
            if (name, key) not in self._warm:  # first call: compile and initialise; this run is the real step
                self._warm.add((name, key))
                return warm_up(fn)
            if len(self._graphs) >= _MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[(name, key)] = cuda_graph(fn)
        graph, out = entry
        graph.replay()
        return out

    # ----- single process ---------------------------------------------------------------------------------

    def _step_single(self, plan: _Plan) -> None:
        if any(m.p.grad is None for m in plan.members):
            self._step_eager_subset(plan)
            return
        fn = self._fn("single", plan)
        bufs = {m.row: self._buffer(m, plan) for m in plan.members}

        def work(group: _Group):
            params = [m.p for m in group.members]
            grads = [m.p.grad for m in group.members]
            return fn(params, grads, [bufs[m.row] for m in group.members], plan.h, *group.statics())

        def run_all():
            streams = self._get_streams(len(plan.groups)) if self._fast(plan) and self.use_streams else None
            run_on_streams([lambda g=g: work(g) for g in plan.groups], streams)

        key = tuple((m.p.data_ptr(), m.p.grad.data_ptr(), bufs[m.row].data_ptr()) for m in plan.members)
        self._run("single", key, run_all)

    def _step_eager_subset(self, plan: _Plan) -> None:
        """Parameters without a gradient are skipped (as torch.optim does); rare, so no graph."""
        for group in plan.groups:
            ms = [m for m in group.members if m.p.grad is not None]
            if not ms:
                continue
            sub = _Group(ms, group.nesterov, group.row_normalize, group.coeffs)
            _single_step(
                [m.p for m in ms],
                [m.p.grad for m in ms],
                [self._buffer(m, plan) for m in ms],
                plan.h,
                *sub.statics(),
            )

    def _get_streams(self, n: int):
        if n < 2:
            return None
        if self._streams is None or len(self._streams) < n:
            self._streams = [torch.cuda.Stream() for _ in range(n)]
        return self._streams[:n]

    # ----- sharded ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def launch_reduce_scatters(self) -> None:
        """Start the async reduce-scatter of every bank's gradient (largest first); a no-op on one rank.

        Call it right after backward (and gradient clipping), step the other optimizers, then call step().
        """
        plan = self._get_plan()
        if not plan.sharded or self._rs_pending:
            return
        for group in plan.groups:
            for m in group.members:
                dst = m.send[: m.batch]
                if m.p.grad is None:
                    dst.zero_()
                else:
                    dst.copy_(m.p.grad.reshape(dst.shape))
                m.rs_work = dist.reduce_scatter_tensor(
                    m.recv, m.send, op=plan.rs_op, group=plan.process_group, async_op=True
                )
        self._rs_pending = True

    def _step_sharded(self, plan: _Plan) -> None:
        self.launch_reduce_scatters()
        prepare, apply = self._fn("prepare", plan), self._fn("apply", plan)
        previous = None
        for gi, group in enumerate(plan.groups):
            for m in group.members:
                m.rs_work.wait()
            bufs = [self._buffer(m, plan) for m in group.members]
            recvs = [m.recv for m in group.members]
            key = (gi, tuple(t.data_ptr() for t in bufs))
            X = self._run(
                "prepare", key, lambda r=recvs, b=bufs, g=group: prepare(r, b, plan.h, *g.statics())
            )
            for m, off in zip(group.members, group.offsets):
                m.ag_work = dist.all_gather_into_tensor(
                    m.gathered, X[off : off + m.shard], group=plan.process_group, async_op=True
                )
            if previous is not None:
                self._apply_sharded(previous, plan, apply)
            previous = (gi, group)
        if previous is not None:
            self._apply_sharded(previous, plan, apply)
        self._rs_pending = False

    def _apply_sharded(self, indexed_group, plan: _Plan, apply) -> None:
        gi, group = indexed_group
        for m in group.members:
            m.ag_work.wait()
        params = [m.p for m in group.members]
        updates = [m.gathered[: m.batch] for m in group.members]
        rows, transpose = tuple(m.row for m in group.members), tuple(m.transpose for m in group.members)
        key = (gi, tuple(p.data_ptr() for p in params))
        self._run("apply", key, lambda: apply(params, updates, plan.h, rows, transpose))

    # ----- optimizer API ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._get_plan()
        if not plan.members:
            return loss
        self._write_hyper(plan)
        if plan.sharded:
            self._step_sharded(plan)
        else:
            self._step_single(plan)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state; momentum is copied into the existing buffers (their addresses are baked into CUDA
        graphs) and buffers absent from `state_dict` (a snapshot taken before the first step) are zeroed."""
        old = {p: s["momentum_buffer"] for p, s in self.state.items() if "momentum_buffer" in s}
        super().load_state_dict(state_dict)
        plan = self._get_plan()
        for m in plan.members:
            new = self.state[m.p].get("momentum_buffer") if m.p in self.state else None
            expected = self._momentum_shape(m.p, plan)
            if new is not None and tuple(new.shape) != expected:
                raise ValueError(
                    f"Muon.load_state_dict: momentum buffer of shape {tuple(new.shape)} for a parameter of "
                    f"shape {tuple(m.p.shape)}; expected {expected} (world size {plan.world}). "
                    "Sharded Muon state loads back only at the world size it was saved with."
                )
            buf = old.get(m.p)
            if buf is not None and tuple(buf.shape) == expected:
                if new is None:
                    buf.zero_()
                else:
                    buf.copy_(new)
                self.state[m.p]["momentum_buffer"] = buf
            elif new is not None:
                self.state[m.p]["momentum_buffer"] = new.to(self.momentum_dtype).contiguous()
