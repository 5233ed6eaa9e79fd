"""One training step (forward + backward) of the record model at the record micro-batch, 48 x 2048.

Both loop modes (11 and 17 virtual layers). Model in training dtypes (bf16 embedding master, fp32
banks and scalars cast per use, bf16 activations), compiled with torch.compile(fullgraph=True,
dynamic=False), gradients reset to None inside each timed call. Providers:
  compile+ref   MLP and loss through the torch references (mlp_impl = ce_impl = "torch") and PyTorch's
                own attention selection (attn_impl = "sdpa"); the baseline
  compile+ours  our fused MLP and fused softcapped cross-entropy (impl "auto") and the measured fastest
                correct attention backend (attn_impl = "auto", kernels/attention.py)
flops = GPT.flops_per_token(looping) x tokens (matmuls incl. LM head + causal attention, 3x forward),
so TFLOP/s and % of the matmul ceiling read as MFU. bytes = 0: a training step is not a bandwidth
figure. Peak memory is what the step allocates beyond the resident weights.
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, register

BATCH, SEQ_LEN = 48, 2048
QUICK_BATCH = 16


def _setup(batch: int, looping: bool, impl: str):
    def setup():
        from model import GPT, get_config

        torch.manual_seed(0)
        attn = "sdpa" if impl == "torch" else "auto"  # the reference: PyTorch's own attention selection
        model = GPT(get_config("record", mlp_impl=impl, ce_impl=impl, attn_impl=attn)).cuda()
        model.to_training_dtypes()
        model.set_looping(looping)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, SEQ_LEN), device="cuda")
        targets = torch.randint(0, vocab, (batch, SEQ_LEN), device="cuda")

        def step():
            model.zero_grad(set_to_none=True)
            loss = compiled(ids, targets)
            loss.backward()
            return loss

        return step

    return setup


@register(
    "model", "record model train step (fwd+bwd, 48x2048, bf16): torch.compile with reference vs fused kernels"
)
def cases(quick: bool) -> list[Case]:
    from model import GPT, GPTConfig

    batch = QUICK_BATCH if quick else BATCH
    with torch.device("meta"):  # flop counting only: no memory, no CUDA
        counter = GPT(GPTConfig())
    out = []
    for looping in (False, True):
        tokens = batch * SEQ_LEN
        out.append(
            Case(
                suite="model",
                label=f"{'looped' if looping else 'flat'} B={batch}",
                params={"looping": looping, "batch": batch, "seq_len": SEQ_LEN, "tokens": tokens},
                flops=counter.flops_per_token(looping, SEQ_LEN) * tokens,
                bytes=0.0,
                providers=[
                    Provider("compile+ref", _setup(batch, looping, "torch"), needs_cuda),
                    Provider("compile+ours", _setup(batch, looping, "auto"), needs_cuda),
                ],
                baseline="compile+ref",
                series=("looping",),
                notes="flops: matmuls + causal attention (FlashAttention convention), fwd+bwd = 3x fwd",
            )
        )
    return out
