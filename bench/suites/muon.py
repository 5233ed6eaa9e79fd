"""Newton-Schulz and Muon over the record's four parameter banks (SPEC.md 4.1, 5.2), 5 NS steps.

Cases:
  all banks     qo 22x512x512, kv 22x256x512, up 11x2048x512, down 11x512x2048 (one GPU holds everything)
  8-way shard   one rank's share when 8 ranks split the padded banks: 3 qo + 3 kv + 2 up + 2 down
  Muon.step()   the whole single-GPU step over the four fp32 banks: momentum, Nesterov, row norm, NS, update

NS providers: the seed's NS (seed_ns: optim's bf16 reference) per matrix in a loop, batched eager, batched
torch.compile (one compile per bank shape, as the record does), the same replayed as one CUDA graph
(the baseline), and ours (optim.BankedNewtonSchulz: trace-normalised 3-GEMM steps, up+down merged into one
512x2048 stack, bank groups on separate streams, one CUDA graph) plus two ablations of ours.
FLOPs per NS step on an m x n matrix (m <= n): 4 m^2 n + 2 m^3. Bytes: read the bf16 input, write the
bf16 output (the Muon step: fp32 grad read, bf16 momentum read+write, fp32 weight read+write).
--quick: Muon.step() only (the seed-style step and ours, each compiling NS for the four bank shapes):
the Newton-Schulz cases' baseline alone compiled and captured for 22 s on the H100, and every other
provider compiles and captures graphs of its own.
"""

from __future__ import annotations

import math

import torch

from bench.registry import Case, Provider, needs_cuda, register
from optim import BankedNewtonSchulz, Muon, ns_flops
from optim.newton_schulz import cuda_graph, newton_schulz_ref, warm_up

STEPS = 5
BANKS = {"qo": (22, 512, 512), "kv": (22, 256, 512), "up": (11, 2048, 512), "down": (11, 512, 2048)}
SHARD = {"qo": (3, 512, 512), "kv": (3, 256, 512), "up": (2, 2048, 512), "down": (2, 512, 2048)}


def seed_ns(G: torch.Tensor) -> torch.Tensor:
    """The seed's NS (modded-nanogpt's zeropower_via_newtonschulz5, batched over a leading dim): the plain
    bf16 textbook iteration, i.e. optim's reference in bf16. The honest competitor."""
    return newton_schulz_ref(G, STEPS, dtype=torch.bfloat16)


def _stacks(shapes: dict) -> list[torch.Tensor]:
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes.values()]


def _loop(shapes):
    def setup():
        stacks = _stacks(shapes)
        return lambda: [seed_ns(G[i]) for G in stacks for i in range(G.size(0))]

    return setup


def _batched(shapes, compiled: bool, graphed: bool):
    def setup():
        stacks = _stacks(shapes)
        fn = torch.compile(seed_ns, fullgraph=True) if compiled else seed_ns
        run = lambda: [fn(G) for G in stacks]
        if not graphed:
            return run
        warm_up(run)
        warm_up(run)
        return cuda_graph(run)[0].replay

    return setup


def _ours(shapes, **kw):
    def setup():
        return BankedNewtonSchulz(_stacks(shapes), STEPS, **kw)

    return setup


def _ns_case(label: str, shapes: dict, loop: bool) -> Case:
    mats = [(m, n) for b, m, n in shapes.values() for _ in range(b)]
    elements = sum(m * n for m, n in mats)
    providers = []
    if loop:
        providers.append(Provider("per-matrix loop", _loop(shapes), needs_cuda))
    providers += [
        Provider("batched eager", _batched(shapes, False, False), needs_cuda),
        Provider("batched torch.compile", _batched(shapes, True, False), needs_cuda),
        Provider("batched torch.compile graphed", _batched(shapes, True, True), needs_cuda),
        Provider("ours", _ours(shapes), needs_cuda),
        Provider("ours no-merge", _ours(shapes, merge=False), needs_cuda),
        Provider("ours no-streams", _ours(shapes, streams=False), needs_cuda),
    ]
    return Case(
        suite="muon",
        label=label,
        params={"what": label, "matrices": len(mats), "steps": STEPS},
        flops=float(sum(ns_flops(m, n, STEPS) for m, n in mats)),
        bytes=2.0 * 2 * elements,
        providers=providers,
        baseline="batched torch.compile graphed",
        x="what",
        notes="NS, 5 quintic steps, bf16 in/out",
    )


def _muon_step(cuda_graph: bool, streams: bool = True):
    def setup():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in BANKS.values()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = Muon(params, lr=0.022, weight_decay=0.095, cuda_graph=cuda_graph, streams=streams)
        for _ in range(3):  # warm-up step (compile) and graph capture happen here, not in the timing
            opt.step()
        return opt.step

    return setup


def _seed_muon_step():
    """The record's single-GPU Muon: bf16 momentum, eager elementwise, compiled batched NS per bank."""

    def setup():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in BANKS.values()]
        bufs = [torch.zeros(s, device="cuda", dtype=torch.bfloat16) for s in BANKS.values()]
        for p in params:
            p.grad = torch.randn_like(p)
        ns = torch.compile(seed_ns, fullgraph=True)
        lr, wd, mu = 0.022, 0.095, 0.97

        @torch.no_grad()
        def step():
            for p, buf in zip(params, bufs):
                g = p.grad.bfloat16()
                buf.mul_(mu).add_(g)
                u = g.add(buf, alpha=mu)
                u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(u.dtype)
                x = ns(u)
                scale = math.sqrt(max(1.0, p.size(-2) / p.size(-1)))
                p.mul_(1 - lr * wd).add_(x.to(p.dtype), alpha=-lr * scale)

        return step

    return setup


@register("muon", "Newton-Schulz over the record's banks (all, 8-way shard) and the whole Muon step")
def cases(quick: bool) -> list[Case]:
    out = (
        [] if quick else [_ns_case("all banks", BANKS, loop=True), _ns_case("8-way shard", SHARD, loop=True)]
    )
    elements = sum(math.prod(s) for s in BANKS.values())
    mats = [(m, n) for b, m, n in BANKS.values() for _ in range(b)]
    out.append(
        Case(
            suite="muon",
            label="Muon.step()",
            params={"what": "Muon.step()", "matrices": len(mats), "steps": STEPS},
            flops=float(sum(ns_flops(m, n, STEPS) for m, n in mats)),
            bytes=float(elements * (4 + 2 + 2 + 4 + 4)),
            providers=[
                Provider("seed-style step", _seed_muon_step(), needs_cuda),
                Provider("ours eager", _muon_step(False), needs_cuda),
                Provider("ours", _muon_step(True), needs_cuda),
                Provider("ours no-streams", _muon_step(True, streams=False), needs_cuda),
            ],
            baseline="seed-style step",
            x="what",
            notes="one GPU, four fp32 banks, momentum+Nesterov+MuonEq-R+NS+WD+update; target <= 1.0 ms",
        )
    )
    if quick:  # the baseline and ours
        out[0].providers = [p for p in out[0].providers if p.name in ("seed-style step", "ours")]
    return out
