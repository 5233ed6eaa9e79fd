"""GPTQ + SDClip, the artifact container and the size cap (SPEC.md §7), on the tiny GPT."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from model import quant
from model.config import get_config
from tests.model.random_models import random_gpt

LOW_THRESHOLD = 1000  # the tiny model's matrices are below the record's 65,536: quantise them anyway


def train_batches(n: int, seed: int = 1, b: int = 4, t: int = 48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (b, t), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model_and_hessians():
    m = random_gpt()
    return m, quant.collect_hessians(m, iter(train_batches(3)))


def gptq_reference(w, h, clip_sigmas, clip_range, block_size):
    """Textbook single-matrix GPTQ with SDClip, one column at a time (SPEC §7.3)."""
    w = w.float().clone()
    rows, cols = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(0.01 * h.diag().mean())
    perm = torch.argsort(h.diag(), descending=True)
    wp = w[:, perm].clone()
    wp[:, dead[perm]] = 0
    h = h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = (clip_sigmas * w.std(dim=1) / clip_range).clamp_min(1e-10).half()
    sf = s.float()
    q_out = torch.zeros(rows, cols, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wb, hb, err = wp[:, i1:i2].clone(), hinv[i1:i2, i1:i2], torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            q = torch.clamp(torch.round(wb[:, j] / sf), -clip_range, clip_range)
            q_out[:, i1 + j] = q.to(torch.int8)
            err[:, j] = (wb[:, j] - q * sf) / hb[j, j]
            wb[:, j:] -= err[:, j, None] * hb[j, j:][None]
        if i2 < cols:
            wp[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q_out[:, torch.argsort(perm)], s


def weighted_error(w, q, s, h):
    """||(W - Wq) X||² = tr(D H Dᵀ) with H = XᵀX / n (the GPTQ objective)."""
    d = w.double() - quant.dequantize(q, s).double()
    return torch.einsum("ij,jk,ik->", d, h.double(), d).item()


@pytest.mark.parametrize(
    "name,bits,k,block",
    [
        ("blocks.1.mlp.proj.weight", 6, 12.85, 64),
        ("blocks.4.attn.c_q.weight", 6, 12.85, 128),
        ("tok_emb.weight", 8, 20.0, 128),
    ],
)
def test_gptq_matches_reference_and_beats_rtn(model_and_hessians, name, bits, k, block):
    m, hessians = model_and_hessians
    w, h = m.unbanked_state_dict()[name].float(), hessians[name].clone()
    # a dead input: zero activation on one feature
    h[3, :] = 0
    h[:, 3] = 0
    r = 2 ** (bits - 1) - 1
    q, s = quant.gptq_quantize(w, h, k, r, block_size=block)
    q_ref, s_ref = gptq_reference(w, h, k, r, block)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.shape == w.shape
    assert torch.equal(s, s_ref)
    assert (q != q_ref).float().mean().item() <= 1e-3  # fp32 reassociation may flip a rare tie
    assert q.abs().max().item() <= r
    assert (q[:, 3] == 0).all()  # dead column zeroed
    q_rtn, s_rtn = quant.rtn_quantize(w, k, r)
    assert torch.equal(s_rtn, s)
    e_gptq, e_rtn = weighted_error(w, q, s, h), weighted_error(w, q_rtn, s, h)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_batched_gptq_equals_per_matrix(model_and_hessians):
    m, hessians = model_and_hessians
    sd = m.unbanked_state_dict()
    names = [f"blocks.{i}.attn.proj.weight" for i in range(3)]
    w = torch.stack([sd[n].float() for n in names])
    h = torch.stack([hessians[n] for n in names])
    qb, sb = quant.gptq_quantize_batched(w, h, 12.85, 31, block_size=16)
    for i, n in enumerate(names):
        q, s = quant.gptq_quantize(sd[n], hessians[n], 12.85, 31, block_size=16)
        assert torch.equal(s, sb[i])
        assert (q != qb[i]).float().mean().item() <= 1e-3


def test_sdclip_scale_formula():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 300, generator=g) * torch.rand(37, 1, generator=g)
    s = quant.sdclip_scale(w, 12.85, 31)
    expected = (12.85 * torch.from_numpy(np.std(w.double().numpy(), axis=1, ddof=1)) / 31).half()
    assert s.dtype == torch.float16 and torch.equal(s, expected)
    # constant rows: std 0 -> clamp 1e-10 -> fp16 zero; quantisation must give zeros, not NaN
    z = torch.zeros(2, 300)
    q, sz = quant.rtn_quantize(z, 12.85, 31)
    assert (sz == 0).all() and (q == 0).all()
    qg, _ = quant.gptq_quantize(z, torch.eye(300), 12.85, 31)
    assert (qg == 0).all()


def test_collect_hessians_divides_by_batches_and_restores_mode():
    m = random_gpt(1)
    m.train()
    m.set_looping(False)
    batches = train_batches(2, seed=5)
    calls: dict[str, int] = {}
    sums: dict[str, torch.Tensor] = {}

    def count(names, x):
        calls[names[0]] = calls.get(names[0], 0) + 1
        sums[names[0]] = sums.get(names[0], 0) + x.double().T @ x.double()

    with torch.no_grad(), m.observe_inputs(count):
        m.eval()
        m.set_looping(True)
        for b in batches:
            m(b)
    m.train()
    m.set_looping(False)
    h = quant.collect_hessians(m, iter([(b, b) for b in batches]))  # (inputs, targets) pairs accepted
    assert m.training and not m.looping  # restored
    cfg = get_config("tiny")
    looped = f"blocks.{cfg.loop_start}.attn.c_q.weight"
    assert calls[looped] == 2 * (cfg.num_loops + 1)  # the looped layer ran 3 passes per batch
    for name, total in sums.items():
        ref = total / 2  # fp32 accumulation vs fp64: relative Frobenius error
        assert ((h[name].double() - ref).norm() / ref.norm()).item() < 1e-5, name
    assert h["blocks.0.attn.c_q.weight"] is h["blocks.0.attn.c_v.weight"]  # Q/K/V share one Hessian
    assert h["tok_emb.weight"].shape == (cfg.model_dim, cfg.model_dim)
    with pytest.raises(ValueError, match="no calibration batch"):
        quant.collect_hessians(m, iter([]))


def test_pack_unpack_roundtrip_and_load(model_and_hessians, tmp_path):
    m, hessians = model_and_hessians
    sd = m.unbanked_state_dict()
    tensors, meta = quant.quantize_state_dict(sd, hessians, passthrough_max_numel=LOW_THRESHOLD)
    n_q = sum(1 for v in meta.values() if v["s"] == "gptq")
    assert n_q == 6 * get_config("tiny").num_layers + 1  # 66-matrix analogue + the embedding
    assert meta["tok_emb.weight"] == {"s": "gptq", "b": 8}
    assert meta["blocks.0.mlp.fc.weight"] == {"s": "gptq", "b": 6}
    assert tensors["blocks.0.mlp.fc.weight.q"].abs().max() <= 31

    back_t, back_m = quant.unpack_artifact(quant.pack_artifact(tensors, meta))
    assert back_m == meta and back_t.keys() == tensors.keys()
    for key, t in tensors.items():
        assert back_t[key].dtype == t.dtype and torch.equal(back_t[key], t), key

    path = tmp_path / "final_model.int6.ptz"
    report = quant.save_artifact(m, hessians, path, passthrough_max_numel=LOW_THRESHOLD)
    assert report["model_bytes"] == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    fresh = random_gpt(seed=9)
    quant.load_artifact(fresh, path)
    got = fresh.unbanked_state_dict()
    for name, info in meta.items():
        if info["s"] == "pt":  # passthrough: exactly the fp16 value
            assert torch.equal(got[name], sd[name].half().to(sd[name].dtype)), name
        else:  # dequantised weight = q * scale of what quantisation produced
            expect = quant.dequantize(tensors[name + ".q"], tensors[name + ".scale"], sd[name].dtype)
            assert torch.equal(got[name], expect), name
            assert not torch.equal(got[name], sd[name])


def test_record_thresholds_on_tiny_model():
    """At the record's 65,536-element threshold nothing of the tiny model is large enough for GPTQ."""
    m = random_gpt()
    tensors, meta = quant.quantize_state_dict(m.unbanked_state_dict(), hessians=None)
    assert all(v == {"s": "pt"} for v in meta.values())
    assert all(t.dtype == torch.float16 for t in tensors.values())
    with pytest.raises(KeyError, match="no Hessian"):
        quant.quantize_state_dict(m.unbanked_state_dict(), {}, passthrough_max_numel=LOW_THRESHOLD)


def test_byte_shuffle_roundtrip():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1001, dtype=np.uint8).tobytes()
    sh = quant.byte_shuffle(data, 2)
    assert sh[:5] == b"BSHF\x02" and sh[5:] == data[0::2] + data[1::2]
    assert quant.byte_unshuffle(sh) == data
    for stride in (1, 3, 7):
        assert quant.byte_unshuffle(quant.byte_shuffle(data, stride)) == data
    assert quant.byte_unshuffle(quant.byte_shuffle(b"", 2)) == b""
    with pytest.raises(ValueError, match="BSHF"):
        quant.byte_unshuffle(b"XXXX\x02abc")


def test_brotli_segments_roundtrip():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 8, 50_001, dtype=np.uint8).tobytes()  # compressible, odd length
    blob = quant.brotli_segments_compress(data, segments=3)
    assert blob[:5] == b"GBQ1\x03" and len(blob) < len(data) // 2
    assert quant.brotli_segments_decompress(blob) == data
    assert quant.brotli_segments_decompress(quant.brotli_segments_compress(b"", 2)) == b""
    with pytest.raises(ValueError, match="CRC"):
        quant.brotli_segments_decompress(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_corrupt_or_truncated_artifact_names_the_file(model_and_hessians, tmp_path):
    m, _ = model_and_hessians
    path = tmp_path / "model.ptz"
    quant.save_artifact(m, None, path, method="rtn", passthrough_max_numel=LOW_THRESHOLD)
    blob = path.read_bytes()
    bad = tmp_path / "truncated.ptz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(quant.ArtifactError, match="truncated.ptz"):
        quant.load_artifact(random_gpt(), bad)
    flipped = bytearray(blob)
    flipped[len(flipped) // 3] ^= 0xFF
    flipped[len(flipped) // 3 + 1] ^= 0x55
    bad2 = tmp_path / "flipped.ptz"
    bad2.write_bytes(bytes(flipped))
    with pytest.raises(quant.ArtifactError, match="flipped.ptz") as exc:
        quant.read_artifact(bad2)
    # the fix is a command to run, not a function to call: train its run again, or rebuild from a checkpoint
    assert "write it again: python train.py --preset record (trains its run again" in str(exc.value)
    assert "save_artifact" not in str(exc.value)
    (tmp_path / "config.json").write_text(json.dumps({"preset": "tiny", "config": {}}))
    with pytest.raises(quant.ArtifactError, match="python train.py --preset tiny"):
        quant.read_artifact(bad2)
    (tmp_path / "ckpt" / "step_000060").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_000060" / "meta.json").write_text("{}")
    with pytest.raises(quant.ArtifactError, match=re.escape(f"--eval-only {tmp_path}/ckpt/step_000060")):
        quant.read_artifact(bad2)
    with pytest.raises(FileNotFoundError, match="missing.ptz"):
        quant.read_artifact(tmp_path / "missing.ptz")


def test_size_report_pass_fail():
    ok = quant.size_report(20_000, quant.CAP_BYTES - 20_000)
    assert ok["status"] == "PASS" and ok["artifact_bytes"] == 16_000_000 and ok["headroom_bytes"] == 0
    over = quant.size_report(20_001, quant.CAP_BYTES - 20_000)
    assert over["status"] == "FAIL" and over["headroom_bytes"] == -1
    with pytest.raises(quant.ArtifactTooLarge, match="exceeds the cap"):
        quant.size_report(20_001, quant.CAP_BYTES - 20_000, strict=True)
    assert quant.size_report(1, 2, cap=3, strict=True)["status"] == "PASS"


def test_clip_sigmas_trade_artifact_size_for_error():
    """A larger SDClip k gives coarser steps: a smaller compressed artifact and a larger weight error."""
    gen = torch.Generator().manual_seed(0)
    sd = {
        "blocks.0.mlp.fc.weight": torch.randn(256, 512, generator=gen),
        "tok_emb.weight": torch.randn(300, 512),
    }
    sizes, errors = [], []
    for k in (12.85, 16.0):
        tensors, meta = quant.quantize_state_dict(sd, None, method="rtn", matrix_clip_sigmas=k)
        sizes.append(len(quant.pack_artifact(tensors, meta)))
        deq = quant.dequantize_state_dict(tensors, meta, sd)
        w = sd["blocks.0.mlp.fc.weight"]
        errors.append((deq["blocks.0.mlp.fc.weight"].float() - w).norm().item() / w.norm().item())
    assert sizes[1] < sizes[0] and errors[1] > errors[0], (sizes, errors)


def test_save_artifact_raises_k_until_the_blob_fits(model_and_hessians, tmp_path):
    """Over budget, the int6 k is raised and the model re-quantised until the blob fits; the embedding's
    k and the passthrough tensors are untouched, and what is written is what fits."""
    m, hessians = model_and_hessians
    kw = dict(passthrough_max_numel=LOW_THRESHOLD)
    free = quant.save_artifact(m, hessians, tmp_path / "free.ptz", **kw)
    assert (free["fit_attempts"], free["fits"]) == (1, True)
    assert free["matrix_clip_sigmas"] == quant.MATRIX_CLIP_SIGMAS

    budget = free["model_bytes"] - 2000  # ~1% of the tiny model's int6 payload (270K elements)
    fitted = quant.save_artifact(m, hessians, tmp_path / "fit.ptz", max_model_bytes=budget, **kw)
    assert fitted["fits"] and fitted["model_bytes"] <= budget
    assert 2 <= fitted["fit_attempts"] <= 3, fitted  # the estimate lands within one more retry
    assert fitted["matrix_clip_sigmas"] > quant.MATRIX_CLIP_SIGMAS
    assert (tmp_path / "fit.ptz").stat().st_size == fitted["model_bytes"]

    tensors, meta = quant.read_artifact(tmp_path / "fit.ptz")
    ref, _ = quant.quantize_state_dict(
        m.unbanked_state_dict(), hessians, matrix_clip_sigmas=fitted["matrix_clip_sigmas"], **kw
    )
    for key in ref:
        assert torch.equal(tensors[key], ref[key]), key  # exactly the quantisation at the k used

    hopeless = quant.save_artifact(
        m, hessians, tmp_path / "no.ptz", max_model_bytes=1000, max_fit_attempts=2, **kw
    )
    assert not hopeless["fits"] and hopeless["fit_attempts"] == 2
    assert hopeless["model_bytes"] < free["model_bytes"]  # the last, smallest blob is written
    with pytest.raises(ValueError, match="max_fit_attempts"):
        quant.save_artifact(m, hessians, tmp_path / "x.ptz", max_fit_attempts=0, **kw)


def test_next_matrix_clip_sigmas_follows_the_bits_per_element_estimate():
    n = 31_719_424  # the record's int6 matrix elements: +1% of k is worth ~57 KB
    k = quant.next_matrix_clip_sigmas(12.85, 56_900, n, margin=1.0)
    assert k == pytest.approx(12.85 * 1.01, rel=1e-3)
    assert quant.next_matrix_clip_sigmas(12.85, 1, n) == pytest.approx(12.85 * 1.001)  # minimum step
    with pytest.raises(ValueError, match="no int6 matrix"):
        quant.next_matrix_clip_sigmas(12.85, 100, 0)
