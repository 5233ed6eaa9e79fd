"""The PR #1523 record model (SPEC.md §3-§4): a GPT whose 66 block matrices live in four fp32 banks.

Per physical layer i the weights are Q=qo_bank[i], O=qo_bank[n+i], K=kv_bank[i], V=kv_bank[n+i],
up=mlp_up_bank[i], down=mlp_down_bank[i], each an F.linear (out, in) matrix cast to the activation
dtype at use. Blocks own only their small fp32 parameters (q_gain, attn_scale, mlp_scale, resid_mix).

The forward pass (SPEC §3.10): rmsnorm(embedding) [+ hash embedding] -> encoder blocks, each output
pushed on a stack -> decoder blocks, each first lerping in a popped skip; from the first decoder
block with physical index >= parallel_start_layer on, the attention and MLP sublayers run as two
separate lanes, merged by `lane_merge` before the final norm -> tied head -> softcap 30.

`looping` switches between the plain U-Net order (encoder [0..n//2), decoder the rest) and the
depth-recurrent order (layers loop_start..loop_end repeated num_loops+1 times). It is a plain Python
bool read at trace time, so torch.compile guards on it and keeps one graph per mode.

Dtypes: activations follow `tok_emb.weight.dtype`. `to_training_dtypes()` gives the seed's
layout: bf16 embedding master, fp32 banks and scalars (cast per use), hence a bf16 residual stream.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .config import KERNEL_IMPL_FIELDS, GPTConfig

Observer = Callable[[tuple, torch.Tensor], None]


class LayerWeights(NamedTuple):
    """One physical layer's six matrices (F.linear (out, in) layout), in SPEC §4.2 order."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


# The one layer -> bank map: where LayerWeights field f of physical layer i lives, bank[i + slot * n]
# with n = num_layers, and its legacy (unbanked, PR #1493) state-dict name.
_BANK_MAP = {
    "q": ("qo_bank", 0, "attn.c_q"),
    "k": ("kv_bank", 0, "attn.c_k"),
    "v": ("kv_bank", 1, "attn.c_v"),
    "o": ("qo_bank", 1, "attn.proj"),
    "up": ("mlp_up_bank", 0, "mlp.fc"),
    "down": ("mlp_down_bank", 0, "mlp.proj"),
}


def legacy_name(layer: int, field: str) -> str:
    return f"blocks.{layer}.{_BANK_MAP[field][2]}.weight"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # eps=None on purpose: torch uses the fp32 machine epsilon (SPEC §10 item 3).
    return F.rms_norm(x, (x.size(-1),))


def virtual_layout(config: GPTConfig, looping: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder) physical layer indices in execution order for one mode (SPEC §3.6)."""
    n = config.num_layers
    if looping and config.num_loops > 0:
        loop = list(range(config.loop_start, config.loop_end + 1))
        order = list(range(config.loop_start)) + loop * (config.num_loops + 1)
        order += list(range(config.loop_end + 1, n))
        half = len(order) // 2
        return order[:half], order[half:]
    return list(range(n // 2)), list(range(n // 2, n))


class Rotary(nn.Module):
    """cos/sin tables of partial rotate-half RoPE over the first `rope_dims` dims of a head.

    The tables for the training length are computed once, in fp32, and kept as non-persistent
    buffers: under torch.compile every kernel that rotates then loads 2 x T x rope_dims/2 numbers
    instead of recomputing arange, pow, cos and sin per element in forward and backward (measured
    on the H200: the fused rms_norm + rotary backward kernel held 93 registers at 31% occupancy).
    inv_freq itself is never a buffer, so module-wide casts (.bfloat16()) cannot quantise the angles:
    a cast table is ignored and the angles recomputed in fp32. The seed's bf16 positions are an
    explicit option instead (config.rope_bf16_positions)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.rope_dims = config.rope_dims
        self.base = config.rope_base
        self.train_seq_len = config.rope_train_seq_len
        self.bf16_positions = config.rope_bf16_positions
        freqs = self._angles(self.train_seq_len, None)
        self.register_buffer("cos_table", freqs.cos().float(), persistent=False)
        self.register_buffer("sin_table", freqs.sin().float(), persistent=False)

    def extra_repr(self) -> str:
        return f"rope_dims={self.rope_dims}, base={self.base}, bf16_positions={self.bf16_positions}"

    def _angles(self, seq_len: int, device: torch.device | None) -> torch.Tensor:
        base = self.base
        if seq_len > self.train_seq_len:
            # NTK-style base rescaling of the seed (fp32 there as well); never reached at 2048.
            base = base * (seq_len / self.train_seq_len) ** (self.rope_dims / max(self.rope_dims - 2, 1))
        j = torch.arange(0, self.rope_dims, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / base ** (j / self.rope_dims)
        if self.bf16_positions and seq_len <= self.train_seq_len:
            # The seed: inv_freq buffer cast by model.bfloat16(), arange(T, dtype=bf16), bf16 outer/cos.
            inv_freq = inv_freq.to(torch.bfloat16)
        t = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
        return torch.outer(t, inv_freq)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables (seq_len, rope_dims/2): the fp32 buffers, or recomputed when they cannot serve."""
        table = self.cos_table
        if seq_len <= table.size(0) and table.dtype == torch.float32 and table.device == device:
            return table[:seq_len], self.sin_table[:seq_len]
        freqs = self._angles(seq_len, device)
        return freqs.cos(), freqs.sin()


class Block(nn.Module):
    """One physical layer's small parameters and its two sublayers; matrices come as arguments."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        d = config.model_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.ln_scale_factor = 1.0 / math.sqrt(layer_idx + 1) if config.ln_scale else 1.0
        self.use_xsa = layer_idx >= config.num_layers - config.xsa_last_n
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init, dtype=torch.float32))
        self.attn_scale = nn.Parameter(torch.ones(d, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(d, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))).float())
        # Each family's kernel ("mlp", "qk", ..., "attn": GPTConfig.*_impl), a constant to torch.compile.
        self.impl = {f.removesuffix("_impl"): getattr(config, f) for f in (*KERNEL_IMPL_FIELDS, "attn_impl")}

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, xsa={self.use_xsa}, ln_scale={self.ln_scale_factor:.4f}"

    def attention(self, x, w_q, w_k, w_v, w_o, cos, sin, observe: Observer | None):
        b, t, _ = x.shape
        i = self.layer_idx
        if observe is not None:
            observe(tuple(legacy_name(i, f) for f in "qkv"), x.detach().reshape(-1, x.size(-1)))
        q = F.linear(x, w_q).reshape(b, t, self.num_heads, self.head_dim)
        k = F.linear(x, w_k).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = F.linear(x, w_v).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = kernels.qk_norm_rope(q, cos, sin, self.q_gain, self.impl["qk"])
        k = kernels.qk_norm_rope(k, cos, sin, None, self.impl["qk"])
        y = kernels.causal_attention(q, k, v, self.impl["attn"])
        if self.use_xsa:
            y = kernels.exclusive_self_attention(y, v, self.impl["xsa"])
        y = y.reshape(b, t, -1)
        if observe is not None:
            observe((legacy_name(i, "o"),), y.detach().reshape(-1, y.size(-1)))
        return F.linear(y, w_o)

    def mlp(self, x, w_up, w_down, observe: Observer | None):
        if observe is None:
            return kernels.fused_mlp(x, w_up, w_down, impl=self.impl["mlp"])
        # Calibration path: the reference math, exposing both matmul inputs.
        i = self.layer_idx
        observe((legacy_name(i, "up"),), x.detach().reshape(-1, x.size(-1)))
        h = F.leaky_relu(F.linear(x, w_up), negative_slope=0.5).square()
        observe((legacy_name(i, "down"),), h.detach().reshape(-1, h.size(-1)))
        return F.linear(h, w_down)

    def attn_residual(self, x, x0, w, cos, sin, observe):
        """(x_in, Attn(rmsnorm(x_in) * s)) with x_in = resid_mix[0] * x + resid_mix[1] * x0. The caller adds
        attn_scale * Attn to x_in: inside the norm that reads the sum, where one does (mlp_residual)."""
        mix, s = self.resid_mix, self.ln_scale_factor
        x_in, x_n = kernels.residual_rms_norm((x, x0), (mix[0], mix[1]), s, self.impl["norm"])
        return x_in, self.attention(x_n, w.q, w.k, w.v, w.o, cos, sin, observe)

    def mlp_residual(self, x, w, observe, attn: torch.Tensor | None = None):
        """h + mlp_scale * MLP(rmsnorm(h) * s) with h = x + attn_scale * attn (h = x when attn is None)."""
        s = self.ln_scale_factor
        if attn is None:  # the MLP lane: no sum to form, and h is x itself
            h, x_n = x, rms_norm(x) * s
        else:
            h, x_n = kernels.residual_rms_norm((x, attn), (None, self.attn_scale), s, self.impl["norm"])
        return h + self.mlp_scale.to(h.dtype) * self.mlp(x_n, w.up, w.down, observe)

    def forward(self, x, x0, w, cos, sin, observe: Observer | None = None):
        x_in, a = self.attn_residual(x, x0, w, cos, sin, observe)
        return self.mlp_residual(x_in, w, observe, attn=a)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        self.config = config = config or GPTConfig()
        n, d, kv, f = config.num_layers, config.model_dim, config.kv_dim, config.mlp_hidden
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.qo_bank = nn.Parameter(torch.empty(2 * n, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * n, kv, d))
        self.mlp_up_bank = nn.Parameter(torch.empty(n, f, d))
        self.mlp_down_bank = nn.Parameter(torch.empty(n, d, f))
        self.blocks = nn.ModuleList(Block(config, i) for i in range(n))
        self.rotary = Rotary(config)
        # Skip count comes from the looped layout and is used in both modes (SPEC §10 item 9).
        self.num_skips = min(len(part) for part in virtual_layout(config, looping=True))
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, d)) if config.skip_gates_enabled else None
        self.lane_merge = nn.Parameter(torch.tensor(0.5))
        self.hash_embed: nn.Embedding | None = None
        self.looping = False
        self._observer: Observer | None = None
        self.reset_parameters()

    # ---------------------------------------------------------------- setup

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC §3.9: tied embedding N(0, 0.005^2); Q, K, V, up orthogonal per slice; O, down zero."""
        if self.qo_bank.is_meta:
            return
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.config.tied_embed_init_std)
        for i in range(self.config.num_layers):
            for f, (bank, j) in self._bank_slots(i).items():
                if f in ("o", "down"):
                    bank[j].zero_()
                else:
                    nn.init.orthogonal_(bank[j], gain=1.0)

    def to_training_dtypes(self, embed_dtype: torch.dtype = torch.bfloat16) -> GPT:
        """The seed's training layout: tok_emb master in `embed_dtype` (bf16; its AdamW updates it in
        bf16), banks, scalars and the hash embedding in fp32. Activations follow the embedding dtype."""
        for p in self.parameters():
            p.data = p.data.float()
        self.tok_emb.weight.data = self.tok_emb.weight.data.to(embed_dtype)
        return self

    def set_looping(self, flag: bool) -> None:
        self.looping = bool(flag)

    def enable_hash_embedding(self, size: int | None = None) -> nn.Embedding:
        """Eval/TTT-time bigram hash embedding (SPEC §3.11): zero-init fp32 (size, dim) table, added
        after the embedding RMSNorm. Not part of the artifact (unbanked_state_dict skips it)."""
        size = size or self.config.hash_embed_size
        emb = nn.Embedding(
            size, self.config.model_dim, device=self.tok_emb.weight.device, dtype=torch.float32
        )
        nn.init.zeros_(emb.weight)
        self.hash_embed = emb
        return emb

    def disable_hash_embedding(self) -> None:
        self.hash_embed = None

    def extra_repr(self) -> str:
        return f"looping={self.looping}, hash_embed={'on' if self.hash_embed is not None else 'off'}"

    def layout(self, looping: bool | None = None) -> dict:
        """Execution plan of one mode: encoder/decoder orders, which decoder positions take a skip,
        and the decoder position where the lanes split (None if they never do)."""
        looping = self.looping if looping is None else looping
        enc, dec = virtual_layout(self.config, looping)
        skip_positions = list(range(min(self.num_skips, len(enc), len(dec))))
        split = next((j for j, i in enumerate(dec) if i >= self.config.parallel_start_layer), None)
        return dict(encoder=enc, decoder=dec, skip_positions=skip_positions, lane_split=split)

    # ---------------------------------------------------------------- forward

    def _bank_slots(self, i: int) -> dict[str, tuple[nn.Parameter, int]]:
        """(bank, index) of each of physical layer i's matrices, by LayerWeights field."""
        n = self.config.num_layers
        return {f: (getattr(self, bank), i + slot * n) for f, (bank, slot, _) in _BANK_MAP.items()}

    def _weights(self, i: int, dtype: torch.dtype) -> LayerWeights:
        return LayerWeights(**{f: bank[j].to(dtype) for f, (bank, j) in self._bank_slots(i).items()})

    def hash_keys(self, ids: torch.Tensor) -> torch.Tensor:
        """(prev * 2039 + cur) mod size, prev = 0 at each sequence's first position (#1523)."""
        prev = F.pad(ids[:, :-1], (1, 0), value=0)
        return (prev * 2039 + ids) % self.hash_embed.num_embeddings

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim), the LM-head input."""
        cfg = self.config
        x = rms_norm(self.tok_emb(ids))
        if self.hash_embed is not None:
            x = x + self.hash_embed(self.hash_keys(ids)).to(x.dtype)
        x0 = x
        dtype = x.dtype
        cos, sin = self.rotary(ids.size(1), ids.device)
        observe = self._observer
        enc, dec = virtual_layout(cfg, self.looping)

        skips = []
        for i in enc:
            x = self.blocks[i](x, x0, self._weights(i, dtype), cos, sin, observe)
            skips.append(x)

        lane_a = lane_m = None  # attention lane / MLP lane, once split
        for j, i in enumerate(dec):
            cur = x if lane_a is None else lane_a
            if j < self.num_skips and skips:
                skip = self.skip_weights[j].to(dtype) * skips.pop()
                if self.skip_gates is not None:
                    cur = torch.lerp(skip, cur, torch.sigmoid(self.skip_gates[j].to(dtype)))
                else:
                    cur = cur + skip
            block, w = self.blocks[i], self._weights(i, dtype)
            if lane_a is None and i < cfg.parallel_start_layer:
                x = block(cur, x0, w, cos, sin, observe)
                continue
            if lane_a is None:
                lane_m = cur
            x_in, a = block.attn_residual(cur, x0, w, cos, sin, observe)
            lane_a = x_in + block.attn_scale.to(dtype) * a
            lane_m = block.mlp_residual(lane_m, w, observe)
        if lane_a is not None:
            lam = self.lane_merge.to(dtype)
            x = lam * lane_a + (1 - lam) * lane_m
        return rms_norm(x)

    def _raw_logits(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids)
        if self._observer is not None:
            self._observer(("tok_emb.weight",), h.detach().reshape(-1, h.size(-1)))
        return F.linear(h, self.tok_emb.weight.to(h.dtype))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Softcapped fp32 logits (B, T, V), or the mean cross-entropy when `targets` is given
        (the softcap is fused into the loss kernel, which reads the raw logits)."""
        logits = self._raw_logits(ids)
        cap = self.config.logit_softcap
        if targets is None:
            return cap * torch.tanh(logits.float() / cap)
        return kernels.softcapped_cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), cap, "mean", impl=self.config.ce_impl
        )

    def per_token_loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 cross-entropy, no reduction (eval / TTT scoring)."""
        logits = self._raw_logits(ids)
        loss = kernels.softcapped_cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            self.config.logit_softcap,
            "none",
            impl=self.config.ce_impl,
        )
        return loss.view(targets.shape)

    @contextlib.contextmanager
    def observe_inputs(self, callback: Observer) -> Iterator[None]:
        """While active, call callback(weight_names, x2d) with the input of every matmul (legacy
        state-dict names, e.g. ("blocks.3.attn.c_q.weight", ...c_k..., ...c_v...)); the MLP runs
        the reference path so its hidden activation can be observed. For GPTQ Hessians."""
        previous, self._observer = self._observer, callback
        try:
            yield
        finally:
            self._observer = previous

    # ---------------------------------------------------------------- state and bookkeeping

    def _legacy_slices(self) -> Iterator[tuple[str, nn.Parameter, int]]:
        for i in range(self.config.num_layers):
            for f, (bank, j) in self._bank_slots(i).items():
                yield legacy_name(i, f), bank, j

    _BANKS = tuple(dict.fromkeys(bank for bank, _, _ in _BANK_MAP.values()))

    def unbanked_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict with each bank replaced by per-layer 2-D tensors under the legacy names of
        SPEC §4.2; the hash embedding (eval-time only) is left out."""
        sd = {
            k: v
            for k, v in self.state_dict().items()
            if k not in self._BANKS and not k.startswith("hash_embed.")
        }
        for name, bank, j in self._legacy_slices():
            sd[name] = bank.detach()[j]
        return sd

    def load_unbanked_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of unbanked_state_dict: restack the legacy slices into banks, load the rest (strict)."""
        sd = dict(sd)
        missing = [name for name, _, _ in self._legacy_slices() if name not in sd]
        if missing:
            raise KeyError(
                f"load_unbanked_state_dict: missing {len(missing)} legacy keys, e.g. {missing[:3]}"
            )
        with torch.no_grad():
            for name, bank, j in self._legacy_slices():
                t = sd.pop(name)
                if t.shape != bank.shape[1:]:
                    raise ValueError(
                        f"load_unbanked_state_dict: {name} has shape {tuple(t.shape)}, "
                        f"expected {tuple(bank.shape[1:])}"
                    )
                bank[j].copy_(t)
        own = {k for k in self.state_dict() if k not in self._BANKS and not k.startswith("hash_embed.")}
        unexpected, absent = sorted(set(sd) - own), sorted(own - set(sd))
        if unexpected or absent:
            raise KeyError(f"load_unbanked_state_dict: unexpected keys {unexpected}, missing keys {absent}")
        self.load_state_dict(sd, strict=False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimizer groups of SPEC §5.1: Muon on the banks, AdamW on the embedding and the scalars.
        The eval-time hash embedding is in none of them (TTT optimises model.parameters())."""
        matrix = [getattr(self, b) for b in self._BANKS]
        embed = [self.tok_emb.weight]
        taken = {id(p) for p in matrix + embed}
        if self.hash_embed is not None:
            taken |= {id(p) for p in self.hash_embed.parameters()}
        scalar = [p for p in self.parameters() if id(p) not in taken]
        return dict(matrix=matrix, embed=embed, scalar=scalar)

    def flops_per_token(self, looping: bool, seq_len: int | None = None) -> float:
        """Training (forward + backward = 3x forward) FLOPs per token: every matmul (block matrices
        per virtual layer, tied LM head) plus causal attention with the FlashAttention convention
        (QK^T and PV, 4*T*dim per token for full attention, halved for causal). Elementwise ops,
        norms, XSA and softmax are not counted."""
        cfg = self.config
        t = seq_len or cfg.train_seq_len
        d, kv, f = cfg.model_dim, cfg.kv_dim, cfg.mlp_hidden
        matmul = 2 * (2 * d * d + 2 * d * kv + 2 * d * f)
        attention = 4 * t * d / 2
        enc, dec = virtual_layout(cfg, looping)
        forward = (len(enc) + len(dec)) * (matmul + attention) + 2 * d * cfg.vocab_size
        return 3.0 * forward
