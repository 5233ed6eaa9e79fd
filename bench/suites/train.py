"""The whole training step of train.py at the record config on one GPU, in both loop modes.

One timed call = one optimizer step exactly as train.py runs it (Trainer.step): `accum` micro-batches of
48 x 2048 tokens forward + backward (bf16 autocast, model compiled with fullgraph=True), the per-rank
gradient clip, the non-finite guard (one host sync) and the optimizer step (Muon on the banks, AdamW on
the embedding and scalars). accum 1 is one rank's step at world size 8 (the record); accum 8 is the whole
786,432-token step on one GPU. Batches are fixed random tokens already on the GPU (no loader cost).

Providers (the same train.py, two settings):
  reference   kernels="torch" (reference MLP and cross-entropy under torch.compile) and
              muon_impl="per_matrix" (one optim.Muon per 2-D matrix, eager: #1493's loop over 66 matrices)
  ours        kernels="auto" (fused MLP + fused softcapped CE) and banked Muon (batched NS, CUDA graphs)
params["tokens"] = tokens per call, so tokens/s = tokens / time. flops = GPT.flops_per_token(looping) x
tokens (matmuls + causal attention, fwd+bwd = 3x fwd), so TFLOP/s over the matmul ceiling reads as MFU.

--quick: accum 1, looped, of the 3-layer record model of the model suite's --quick (QUICK_MODEL there:
every kernel at the record's shapes, fewer layers, because compiling 11 layers per provider takes a
minute or more); Muon then has 3-layer banks, so the optimizer's share of the step is smaller than at
the record.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.registry import Case, Provider, needs_cuda, register

MICRO_SEQS, SEQ_LEN = 48, 2048
SETTINGS = {
    "reference": {"kernels": "torch", "muon_impl": "per_matrix"},
    "ours": {"kernels": "auto", "muon_impl": "banked"},
}


class _FixedBatches:
    """Stands in for model.data.RankBatches: the same micro-batches every step, already on the device."""

    def __init__(self, batches):
        self.batches = batches

    def next(self, j: int, device):
        return self.batches[j]


def build(
    provider: str, accum: int, looping: bool = False, model_overrides: dict | None = None
) -> SimpleNamespace:
    """train.py's pieces for one provider at the record config: cfg, model, model_c (compiled), opts,
    batches (fixed, on the GPU), pd, log. The step profile (bench/profile.py) builds from this too.
    model_overrides: GPTConfig fields to change (--quick's fewer layers)."""
    from model.run.report import Logger
    from model.run_config import resolve_config
    from model.train_step import build_model, compile_model
    from optim.distributed import Dist
    from optim.optimizers import Optimizers

    device = torch.device("cuda")
    tokens = accum * MICRO_SEQS * SEQ_LEN
    cli = {"grad_accum_steps": accum, "train_batch_tokens": tokens, **SETTINGS[provider]}
    cfg = resolve_config("record", env={}, cli=cli, cli_model=model_overrides)
    model = build_model(cfg, device)
    model.set_looping(looping)
    opts = Optimizers(model, cfg, device)
    opts.set_schedule(1.0, cfg.muon_momentum)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (MICRO_SEQS, SEQ_LEN)
    batches = _FixedBatches(
        [
            tuple(torch.randint(0, vocab, shape, device=device, generator=gen) for _ in range(2))
            for _ in range(accum)
        ]
    )
    return SimpleNamespace(
        cfg=cfg,
        model=model,
        model_c=compile_model(model, cfg, device),
        opts=opts,
        batches=batches,
        accum=accum,
        device=device,
        pd=Dist(device=device),
        log=Logger(None, main=False),
    )


def _setup(looping: bool, accum: int, provider: str, model_overrides: dict | None = None):
    def setup():
        from model.train_step import check_finite, clip_gradients, forward_backward

        r = build(provider, accum, looping, model_overrides)

        def step():
            loss = forward_backward(r.model_c, r.batches, r.accum, r.device)
            norm = clip_gradients(r.opts.params, r.cfg.grad_clip_norm)
            check_finite(loss, norm, 0, r.pd, r.log)
            r.opts.step()

        return step

    return setup


@register(
    "train",
    "train.py optimizer step at the record config (fwd+bwd+clip+optimizer, 48x2048 per micro-batch): "
    "reference kernels + per-matrix Muon vs fused kernels + banked Muon",
)
def cases(quick: bool) -> list[Case]:
    from bench.suites.model import QUICK_MODEL
    from model import GPT, get_config

    overrides = QUICK_MODEL if quick else None
    with torch.device("meta"):  # flop counting only: no memory, no CUDA
        counter = GPT(get_config("record", **(overrides or {})))
    layers = counter.config.num_layers
    out = []
    for accum in (1,) if quick else (1, 8):
        for looping in (True,) if quick else (False, True):
            tokens = accum * MICRO_SEQS * SEQ_LEN
            out.append(
                Case(
                    suite="train",
                    label=f"{'looped' if looping else 'flat'} accum={accum}"
                    + (f" L={layers}" if quick else ""),
                    params={
                        "looping": looping,
                        "accum": accum,
                        "micro_seqs": MICRO_SEQS,
                        "seq_len": SEQ_LEN,
                        "tokens": tokens,
                        "layers": layers,
                    },
                    flops=counter.flops_per_token(looping, SEQ_LEN) * tokens,
                    bytes=0.0,
                    providers=[
                        Provider(name, _setup(looping, accum, name, overrides), needs_cuda)
                        for name in SETTINGS
                    ],
                    baseline="reference",
                    x="accum",
                    series=("looping",),
                    notes="one optimizer step of train.py; ms/step = time, tokens/s = tokens / time",
                )
            )
    return out
