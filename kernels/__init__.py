"""GPU kernels of the record model, each with its plain-PyTorch reference beside it."""

from .attention import causal_attention, causal_attention_ref
from .cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_ref
from .mlp import fused_mlp, fused_mlp_ref
from .qk_rope import qk_norm_rope, qk_norm_rope_ref
from .residual_norm import residual_rms_norm, residual_rms_norm_ref
from .xsa import exclusive_self_attention, exclusive_self_attention_ref

__all__ = [
    "causal_attention",
    "causal_attention_ref",
    "exclusive_self_attention",
    "exclusive_self_attention_ref",
    "fused_mlp",
    "fused_mlp_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "residual_rms_norm",
    "residual_rms_norm_ref",
    "softcapped_cross_entropy",
    "softcapped_cross_entropy_ref",
]
