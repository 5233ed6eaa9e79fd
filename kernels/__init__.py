"""GPU kernels of the record model, each with its plain-PyTorch reference beside it."""

from .attention import causal_attention, causal_attention_ref
from .cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_ref
from .mlp import fused_mlp, fused_mlp_ref

__all__ = [
    "causal_attention",
    "causal_attention_ref",
    "fused_mlp",
    "fused_mlp_ref",
    "softcapped_cross_entropy",
    "softcapped_cross_entropy_ref",
]
