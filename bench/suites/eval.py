"""Validation scoring of the record model on one GPU: sliding window and non-overlapping (SPEC.md 8.2).

One timed call = model.evaluate's eval_sliding_window over a fixed stream of random tokens: windows of
2048, looping on, bf16 autocast, 32 windows per forward, every target scored exactly once. Cases:
  stride 64     the record's sliding window (2048 - 64 tokens of context for every scored token)
  stride 2048   non-overlapping windows (the pre-quant / quantized evals), the same scored tokens
Providers: eager scoring (the baseline) and compiled scoring (torch.compile fullgraph, one shape; what
train.py uses). params["tokens"] = scored tokens per call, so tokens/s is the eval throughput that the
seed's 633,409 windows in 92-123 s on 8 GPUs (41-55 K scored tokens/s per GPU) compare with.
flops = windows x forward FLOPs of one 2048-token window (matmuls + causal attention).

--quick: stride 64 only over 8,192 scored tokens (128 windows, 4 forwards of 32), with the 3-layer record
model of the model suite's --quick (QUICK_MODEL there; compiling the 11-layer model takes a minute).
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, register

SEQ_LEN, BATCH_WINDOWS = 2048, 32
SCORED_TOKENS, QUICK_SCORED_TOKENS = 64 * 1024, 8 * 1024


def _setup(scored: int, stride: int, compile: bool, overrides: dict | None = None):
    def setup():
        from model import GPT, get_config
        from model.evaluate import eval_sliding_window

        torch.manual_seed(0)
        model = GPT(get_config("record", **(overrides or {}))).cuda().to_training_dtypes().eval()
        model.set_looping(True)  # every eval runs the looped model
        tokens = torch.randint(0, model.config.vocab_size, (scored + 1,), device="cuda")

        def score():
            return eval_sliding_window(
                model, tokens, SEQ_LEN, stride, BATCH_WINDOWS, device="cuda", compile=compile
            )

        return score

    return setup


@register("eval", "record-model validation scoring (2048 windows, bf16, looped): eager vs compiled")
def cases(quick: bool) -> list[Case]:
    from bench.suites.model import QUICK_MODEL
    from model import GPT, get_config
    from model.evaluate import window_starts

    scored = QUICK_SCORED_TOKENS if quick else SCORED_TOKENS
    overrides = QUICK_MODEL if quick else None
    with torch.device("meta"):  # flop counting only
        counter = GPT(get_config("record", **(overrides or {})))
    layers = counter.config.num_layers
    window_flops = counter.flops_per_token(True, SEQ_LEN) / 3 * SEQ_LEN  # forward only
    out = []
    for stride in (64,) if quick else (64, SEQ_LEN):
        windows = len(window_starts(scored, SEQ_LEN, stride))
        out.append(
            Case(
                suite="eval",
                label=f"stride {stride}" + (f" L={layers}" if quick else ""),
                params={
                    "stride": stride,
                    "seq_len": SEQ_LEN,
                    "windows": windows,
                    "tokens": scored,
                    "layers": layers,
                },
                flops=window_flops * windows,
                bytes=0.0,
                providers=[
                    Provider("eager", _setup(scored, stride, False, overrides), needs_cuda),
                    Provider("compiled", _setup(scored, stride, True, overrides), needs_cuda),
                ],
                baseline="eager",
                x="stride",
                notes="tokens/s = scored tokens / time; seed: 41-55 K tokens/s per H100 at stride 64",
            )
        )
    return out
