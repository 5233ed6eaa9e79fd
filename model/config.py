"""GPTConfig: the shape and switches of the record model; defaults are PR #1523 as it ran.

Values come from SPEC.md §3.1 and Appendix A (#1523 column). Two knobs exist only here:
`rope_bf16_positions` reproduces the seed's bf16 RoPE positions (SPEC §9.2, §10 item 1), and the
`*_impl` fields pick kernels without changing the math.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels._runtime import IMPLS
from kernels.attention import IMPLS as ATTN_IMPLS

# The GPTConfig fields that choose one of our Triton kernels or its reference ("auto" | "triton" | "torch").
KERNEL_IMPL_FIELDS = ("mlp_impl", "ce_impl", "qk_impl", "norm_impl", "xsa_impl")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    # Partial RoPE: the first rope_dims of each head rotate (rotate-half), the rest pass through.
    rope_dims: int = 16
    rope_base: float = 10000.0
    # Beyond this length the seed rescales the RoPE base (NTK); never reached at 2048.
    rope_train_seq_len: int = 2048
    # The seed built its model with .bfloat16(), which also cast the rotary inv_freq buffer, so its
    # positions were arange(T, dtype=bf16): 1,408 of 2,048 positions are rounded (SPEC §9.2). True
    # reproduces that (needed to evaluate a checkpoint trained by the seed); False computes the
    # angles in fp32, as the later records do.
    rope_bf16_positions: bool = False
    qk_gain_init: float = 5.0
    logit_softcap: float = 30.0
    # Sublayer inputs are scaled by 1/sqrt(physical_layer_index + 1).
    ln_scale: bool = True
    # XSA on the last xsa_last_n physical layers (all 11 in the record).
    xsa_last_n: int = 11
    skip_gates_enabled: bool = True
    # Depth recurrence: layers loop_start..loop_end run num_loops+1 times once looping is on.
    loop_start: int = 3
    loop_end: int = 5
    num_loops: int = 2
    # Decoder blocks with physical index >= this run as two lanes (attention lane, MLP lane).
    parallel_start_layer: int = 7
    tied_embed_init_std: float = 0.005
    # Size of the eval-time bigram hash embedding (GPT.enable_hash_embedding); off by default.
    hash_embed_size: int = 16384
    train_seq_len: int = 2048
    # Kernel selection, "auto" | "triton" | "torch" (the reference) per family: kernels.fused_mlp,
    # kernels.softcapped_cross_entropy, kernels.qk_norm_rope (q/k RMSNorm + partial RoPE + gain),
    # kernels.residual_rms_norm (residual mixing + the norm that reads it), kernels.exclusive_self_attention.
    mlp_impl: str = "auto"
    ce_impl: str = "auto"
    qk_impl: str = "auto"
    norm_impl: str = "auto"
    xsa_impl: str = "auto"
    # Attention (kernels.attention): "auto" (the fastest correct backend here, measured) | "sdpa"
    # (PyTorch's own selection: the reference) | one backend ("cudnn", "flash", "fa3", ...).
    attn_impl: str = "auto"

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"GPTConfig: {msg}")

        need(
            self.model_dim % self.num_heads == 0,
            f"model_dim {self.model_dim} % num_heads {self.num_heads} != 0",
        )
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}",
        )
        need(
            0 < self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0,
            f"rope_dims {self.rope_dims} must be even and in (0, head_dim={self.head_dim}]",
        )
        need(self.num_loops >= 0, f"num_loops {self.num_loops} must be >= 0")
        if self.num_loops > 0:
            need(
                0 <= self.loop_start <= self.loop_end < self.num_layers,
                f"need 0 <= loop_start {self.loop_start} <= loop_end {self.loop_end}"
                f" < num_layers {self.num_layers}",
            )
        need(0 <= self.xsa_last_n <= self.num_layers, f"xsa_last_n {self.xsa_last_n} not in [0, num_layers]")
        need(self.logit_softcap > 0, f"logit_softcap {self.logit_softcap} must be > 0")
        need(self.hash_embed_size > 0, f"hash_embed_size {self.hash_embed_size} must be > 0")
        for name in KERNEL_IMPL_FIELDS:
            need(getattr(self, name) in IMPLS, f"{name}={getattr(self, name)!r}, expected one of {IMPLS}")
        need(self.attn_impl in ATTN_IMPLS, f"attn_impl={self.attn_impl!r}, expected one of {ATTN_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)


PRESETS: dict[str, GPTConfig] = {
    # PR #1523 as it ran: 35,944,537 parameters.
    "record": GPTConfig(),
    # Every structural feature of the record (recurrence, skips with gates, split lanes, XSA, partial
    # RoPE), small enough for CPU: virtual order [0,1,2,1,2 | 1,2,3,4,5] when looping, lanes from 4.
    "tiny": GPTConfig(
        vocab_size=1024,
        num_layers=6,
        model_dim=64,
        num_heads=4,
        num_kv_heads=2,
        rope_dims=8,
        xsa_last_n=6,
        loop_start=1,
        loop_end=2,
        num_loops=2,
        parallel_start_layer=4,
        hash_embed_size=4096,
        train_seq_len=128,
        rope_train_seq_len=128,
    ),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """The preset `name` with fields replaced by `overrides` (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown GPTConfig field(s) {unknown} for preset {name!r};"
            f" valid fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(PRESETS[name], **overrides)
