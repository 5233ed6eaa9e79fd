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

--quick: the looped mode only, of a 3-layer model with everything else of the record (QUICK_MODEL:
width 512, 8/4 heads, MLP 2048, vocabulary 8192, the 48 x 2048 micro-batch; layer 1 runs twice, so
the virtual order is [0, 1 | 1, 2]: a skip per decoder block, XSA everywhere, a one-lane decoder
block and a two-lane one). Every kernel runs at the record's shapes, only fewer times. Compilation
is the cost: on the H100 the 11-layer model took 64 s (flat) and 90 s (looped, 17 virtual layers)
per provider, about 17 s plus 4.3 s per virtual layer, so 4 virtual layers take ~35 s cold and a few
seconds with a warm compile cache. Per-layer ratios carry over; the LM head and loss weigh more in
the step (21% of its FLOPs instead of 6%), so the ratio of the whole step leans towards the loss.
"""

from __future__ import annotations

import torch

from bench.registry import Case, Provider, needs_cuda, register

BATCH, SEQ_LEN = 48, 2048
# --quick (also used by the train and eval suites): the record with 3 physical layers (see above)
QUICK_MODEL = {
    "num_layers": 3,
    "loop_start": 1,
    "loop_end": 1,
    "num_loops": 1,
    "parallel_start_layer": 2,
    "xsa_last_n": 3,
}


def _setup(batch: int, looping: bool, impl: str, overrides: dict | None = None):
    def setup():
        from model import GPT, get_config
        from model.config import KERNEL_IMPL_FIELDS

        torch.manual_seed(0)
        attn = "sdpa" if impl == "torch" else "auto"  # the reference: PyTorch's own attention selection
        kernels = dict.fromkeys(KERNEL_IMPL_FIELDS, impl)
        cfg = get_config("record", attn_impl=attn, **kernels, **(overrides or {}))
        model = GPT(cfg).cuda()
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
    from model import GPT, get_config

    batch = BATCH
    overrides = QUICK_MODEL if quick else {}
    with torch.device("meta"):  # flop counting only: no memory, no CUDA
        counter = GPT(get_config("record", **overrides))
    layers = counter.config.num_layers
    out = []
    for looping in (True,) if quick else (False, True):
        tokens = batch * SEQ_LEN
        out.append(
            Case(
                suite="model",
                label=f"{'looped' if looping else 'flat'} B={batch}" + (f" L={layers}" if quick else ""),
                params={
                    "looping": looping,
                    "batch": batch,
                    "seq_len": SEQ_LEN,
                    "tokens": tokens,
                    "layers": layers,
                },
                flops=counter.flops_per_token(looping, SEQ_LEN) * tokens,
                bytes=0.0,
                providers=[
                    Provider("compile+ref", _setup(batch, looping, "torch", overrides), needs_cuda),
                    Provider("compile+ours", _setup(batch, looping, "auto", overrides), needs_cuda),
                ],
                baseline="compile+ref",
                series=("looping",),
                notes="flops: matmuls + causal attention (FlashAttention convention), fwd+bwd = 3x fwd",
            )
        )
    return out
