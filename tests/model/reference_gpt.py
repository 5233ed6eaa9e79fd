"""A plainly written, unbanked version of the record model's math, used only as a test oracle.

Everything is spelled out: one weight matrix per layer under the legacy names, explicit causal
softmax attention with repeated KV heads, RoPE from its formula, XSA head by head, the U-Net stack,
and the two lanes. It shares no code with model/gpt.py (only the config object for the sizes) and
loads its weights from GPT.unbanked_state_dict(). Written for float64.
"""

from __future__ import annotations

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm(eps=None) uses for fp32 inputs


def rmsnorm(x):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + FP32_EPS)


def rope(x, rope_dims, base, position_dtype=torch.float64):
    """Rotate-half RoPE on dims [0, rope_dims) of x (B, T, H, D)."""
    T = x.shape[1]
    half = rope_dims // 2
    freqs = torch.zeros(T, half, dtype=torch.float64)
    for j in range(half):
        inv = 1.0 / base ** (2 * j / rope_dims)
        inv = torch.tensor(inv, dtype=torch.float32).to(position_dtype)
        pos = torch.arange(T, dtype=position_dtype)
        freqs[:, j] = (pos * inv).to(torch.float64)
    cos = torch.cos(freqs)[None, :, None, :]
    sin = torch.sin(freqs)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:rope_dims]
    out1 = x1 * cos + x2 * sin
    out2 = -x1 * sin + x2 * cos
    return torch.cat([out1, out2, x[..., rope_dims:]], dim=-1)


class ReferenceGPT:
    def __init__(self, config, state_dict, looping):
        self.cfg = config
        self.w = {k: v.detach().to(torch.float64).clone() for k, v in state_dict.items()}
        self.looping = looping
        self.hash_table = None

    def layer_order(self):
        c = self.cfg
        if self.looping:
            order = list(range(c.loop_start))
            for _ in range(c.num_loops + 1):
                order += list(range(c.loop_start, c.loop_end + 1))
            order += list(range(c.loop_end + 1, c.num_layers))
            # The skip count is always taken from the looped layout.
        else:
            half = c.num_layers // 2
            order = list(range(c.num_layers))
            return order[:half], order[half:]
        n_enc = len(order) // 2
        return order[:n_enc], order[n_enc:]

    def num_skips(self):
        saved = self.looping
        self.looping = True
        enc, dec = self.layer_order()
        self.looping = saved
        return min(len(enc), len(dec))

    def attention(self, i, x):
        c = self.cfg
        W = self.w
        B, T, _ = x.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.model_dim // c.num_heads
        q = (x @ W[f"blocks.{i}.attn.c_q.weight"].T).view(B, T, H, D)
        k = (x @ W[f"blocks.{i}.attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (x @ W[f"blocks.{i}.attn.c_v.weight"].T).view(B, T, Hkv, D)
        q, k = rmsnorm(q), rmsnorm(k)
        pos_dtype = torch.bfloat16 if c.rope_bf16_positions else torch.float32
        q = rope(q, c.rope_dims, c.rope_base, pos_dtype)
        k = rope(k, c.rope_dims, c.rope_base, pos_dtype)
        q = q * W[f"blocks.{i}.q_gain"].view(1, 1, H, 1)
        group = H // Hkv
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        heads = []
        for h in range(H):
            g = h // group
            scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
            scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v[:, :, g]  # (B, T, D)
            if i >= c.num_layers - c.xsa_last_n:
                unit = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True)
                y = y - (y * unit).sum(-1, keepdim=True) * unit
            heads.append(y)
        y = torch.cat(heads, dim=-1)
        return y @ W[f"blocks.{i}.attn.proj.weight"].T

    def mlp(self, i, x):
        u = x @ self.w[f"blocks.{i}.mlp.fc.weight"].T
        u = torch.where(u > 0, u, 0.5 * u) ** 2
        return u @ self.w[f"blocks.{i}.mlp.proj.weight"].T

    def scale(self, i):
        return 1.0 / math.sqrt(i + 1) if self.cfg.ln_scale else 1.0

    def attn_step(self, i, x, x0):
        W = self.w
        mix = W[f"blocks.{i}.resid_mix"]
        x_in = mix[0] * x + mix[1] * x0
        return x_in + W[f"blocks.{i}.attn_scale"] * self.attention(i, rmsnorm(x_in) * self.scale(i))

    def mlp_step(self, i, x):
        return x + self.w[f"blocks.{i}.mlp_scale"] * self.mlp(i, rmsnorm(x) * self.scale(i))

    def logits(self, ids):
        c = self.cfg
        W = self.w
        x = rmsnorm(W["tok_emb.weight"][ids])
        if self.hash_table is not None:
            size = self.hash_table.shape[0]
            keys = torch.zeros_like(ids)
            for t in range(ids.shape[1]):
                prev = ids[:, t - 1] if t > 0 else torch.zeros_like(ids[:, 0])
                keys[:, t] = (prev * 2039 + ids[:, t]) % size
            x = x + self.hash_table[keys]
        x0 = x
        enc, dec = self.layer_order()
        n_skip = self.num_skips()
        stack = []
        for i in enc:
            x = self.mlp_step(i, self.attn_step(i, x, x0))
            stack.append(x)
        split = False
        attn_lane = mlp_lane = None
        for j, i in enumerate(dec):
            cur = attn_lane if split else x
            if j < n_skip and len(stack) > 0:
                skip = W["skip_weights"][j] * stack.pop()
                if c.skip_gates_enabled:
                    g = torch.sigmoid(W["skip_gates"][j])
                    cur = (1 - g) * skip + g * cur
                else:
                    cur = cur + skip
            if not split and i >= c.parallel_start_layer:
                split = True
                mlp_lane = cur.clone()
            if split:
                attn_lane = self.attn_step(i, cur, x0)
                mlp_lane = self.mlp_step(i, mlp_lane)
            else:
                x = self.mlp_step(i, self.attn_step(i, cur, x0))
        if split:
            lam = W["lane_merge"]
            x = lam * attn_lane + (1 - lam) * mlp_lane
        z = rmsnorm(x) @ W["tok_emb.weight"].T
        return c.logit_softcap * torch.tanh(z / c.logit_softcap)
