"""The artifact: GPTQ + SDClip quantisation, the compressed container, and the 16,000,000-byte cap.

SPEC.md §7. The flow used by train.py::

    hessians = collect_hessians(model, train_batches)        # TRAINING batches, never validation
    report = save_artifact(model, hessians, path)             # GPTQ -> torch.save -> shuffle -> Brotli-11
    load_artifact(model, path)                                # reverse, dequantise, load into the banks
    size = size_report(code_size()["code_bytes"], report["model_bytes"])  # PASS/FAIL (model/run/shipped_code)

Quantisation runs on ``model.unbanked_state_dict()`` (per-layer 2-D matrices with the legacy names), so
call ``save_artifact`` with the EMA weights already loaded into the model.

Over 500 lines on purpose: Hessians, GPTQ, the compressed container and the fit to the cap are one
pipeline read top to bottom (the code's side of the cap is model/run/shipped_code.py).
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import brotli
import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write

CAP_BYTES = 16_000_000  # decimal: code + compressed model ([RULES])
PASSTHROUGH_MAX_NUMEL = 65_536  # tensors with at most this many elements are stored as fp16
EMBED_NAME = "tok_emb.weight"
MATRIX_BITS, MATRIX_CLIP_SIGMAS = 6, 12.85  # tuned in #1394 to land just under 16 MB
EMBED_BITS, EMBED_CLIP_SIGMAS = 8, 20.0  # the tied embedding/head is more sensitive
BLOCK_SIZE = 128
DAMP = 0.01
SHUFFLE_MAGIC = b"BSHF"
BROTLI_QUALITY = 11
BROTLI_SEGMENTS = 16  # independent Brotli streams, compressed in parallel (see brotli_segments_compress)
SEGMENTS_MAGIC = b"GBQ1"


class ArtifactError(ValueError):
    """An artifact file that cannot be read back (corrupt, truncated, or not an artifact)."""


class ArtifactTooLarge(RuntimeError):
    """code bytes + compressed model bytes exceed the cap."""


# ---------------------------------------------------------------------------------------------------
# Hessians (SPEC §7.2)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_hessians(
    model: torch.nn.Module,
    batches: Iterable,
    autocast_dtype: torch.dtype | None = None,
    tf32: bool = True,
) -> dict[str, Tensor]:
    """H = Σ XᵀX (fp32) of every quantised matrix's input, divided by the number of batches.

    ``batches`` must come from the TRAINING stream (the record uses the first 64 training batches of
    each rank); calibrating on validation tokens would leak them into the artifact. Each item is an
    input-id tensor (B, T) or an ``(inputs, targets)`` pair. The model runs in eval mode with looping
    active; looped layers are called several times per forward and accumulate every pass (SPEC §10
    item 14), which is why the divisor is the number of batches, not of calls. Matrices that share an
    input (c_q/c_k/c_v) share one Hessian tensor in the result. Every rank computes its own Hessians
    (nothing is all-reduced); the artifact comes from rank 0. ``autocast_dtype`` defaults to bf16 on
    CUDA (as the record calibrates) and none on CPU.

    ``tf32`` (CUDA only): the XᵀX products run on TF32 tensor cores, accumulated into fp32 buffers.
    Measured on an H100 (record model, 64 batches of 48x2048): 27.6 s -> 13.5 s, relative Frobenius
    error of one batch's XᵀX vs fp64 5.9e-4 (fp32: 1.1e-5), 17x below the 1% damping GPTQ adds.
    The MLP hidden (2048 wide, fp32 under autocast because of the square) dominates the cost.
    """
    sums: dict[tuple[str, ...], Tensor] = {}

    def observe(names: tuple[str, ...], x2d: Tensor) -> None:
        x = x2d.detach().reshape(-1, x2d.shape[-1])
        h = sums.get(names)
        if h is None:
            h = sums[names] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        x = x.float()
        h.addmm_(x.T, x)

    device = next(model.parameters()).device
    if autocast_dtype is None and device.type == "cuda":
        autocast_dtype = torch.bfloat16
    was_training, was_looping = model.training, bool(model.looping)
    model.eval()
    model.set_looping(True)
    n_batches = 0
    precision = torch.get_float32_matmul_precision()
    if tf32 and device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        with model.observe_inputs(observe):
            for batch in batches:
                ids = batch[0] if isinstance(batch, tuple | list) else batch
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    model(ids.to(device, non_blocking=True))
                n_batches += 1
    finally:
        torch.set_float32_matmul_precision(precision)
        model.set_looping(was_looping)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("collect_hessians: `batches` yielded no calibration batch")
    out: dict[str, Tensor] = {}
    for names, h in sums.items():
        h /= n_batches
        for name in names:
            out[name] = h
    return out


# ---------------------------------------------------------------------------------------------------
# GPTQ with SDClip (SPEC §7.3)
# ---------------------------------------------------------------------------------------------------


def sdclip_scale(w: Tensor, clip_sigmas: float, clip_range: int) -> Tensor:
    """Per-row scale s = k·std(row) / clip_range (unbiased std, fp32), clamped ≥ 1e-10, rounded to fp16.

    Rounded before quantising so that encoder and decoder use the same value (SPEC §10 item 6).
    Works on (rows, cols) or stacked (B, rows, cols) weights; returns fp16 of shape w.shape[:-1].
    """
    std = w.float().std(dim=-1, unbiased=True)
    return (clip_sigmas * std / clip_range).clamp_min(1e-10).to(torch.float16)


def _divisor(scale: Tensor) -> Tensor:
    # A constant row has std 0 and its 1e-10 clamp rounds to fp16 zero (as in the record); dividing by
    # the smallest normal float instead of 0 gives q = 0 rather than NaN for all-zero rows.
    return scale.float().clamp_min(torch.finfo(torch.float32).tiny)


def rtn_quantize(w: Tensor, clip_sigmas: float, clip_range: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest with the SDClip scales (the baseline GPTQ is measured against)."""
    scale = sdclip_scale(w, clip_sigmas, clip_range)
    q = torch.clamp(torch.round(w.float() / _divisor(scale).unsqueeze(-1)), -clip_range, clip_range)
    return q.to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ≈ q · s_row, cast to the template dtype."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def gptq_quantize(
    w: Tensor, hessian: Tensor, clip_sigmas: float, clip_range: int, block_size: int = BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """GPTQ of one matrix W (rows, cols) with input Hessian H (cols, cols): (q int8, scale fp16 (rows,))."""
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gptq_quantize: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} mismatch"
        )
    q, s = gptq_quantize_batched(w[None], hessian[None], clip_sigmas, clip_range, block_size)
    return q[0], s[0]


@torch.no_grad()
def gptq_quantize_batched(
    w: Tensor,
    hessian: Tensor,
    clip_sigmas: float,
    clip_range: int,
    block_size: int = BLOCK_SIZE,
    names: Iterable[str] = (),
) -> tuple[Tensor, Tensor]:
    """GPTQ on a stack of B same-shape matrices (B, rows, cols), each with its own Hessian (B, cols, cols).

    Each slice gets exactly the single-matrix algorithm of SPEC §7.3 (the matrices are independent);
    the stack only turns B×cols Python-level column steps into cols batched ones. Runs on the
    Hessian's device. ``names`` are only used in error messages.
    """
    dev = hessian.device
    w_orig = w.to(dev, torch.float32)
    nb, rows, cols = w_orig.shape
    h = hessian.to(torch.float32).clone()
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(DAMP * diag.mean(dim=-1, keepdim=True))
    perm = torch.argsort(diag, dim=-1, descending=True)
    invperm = torch.argsort(perm, dim=-1)
    w_work = torch.gather(
        w_orig.masked_fill(dead.unsqueeze(1), 0.0), 2, perm.unsqueeze(1).expand(-1, rows, -1)
    )
    h = torch.gather(h, 1, perm.unsqueeze(2).expand(-1, -1, cols))
    h = torch.gather(h, 2, perm.unsqueeze(1).expand(-1, cols, -1))
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        hinv = torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"GPTQ: Hessian of {list(names) or 'matrix'} is not positive definite ({e})") from e

    scale = sdclip_scale(w_orig, clip_sigmas, clip_range)  # std of the original rows, before zeroing
    s = scale.float()
    s_div = _divisor(scale)
    q_all = torch.empty(nb, rows, cols, dtype=torch.int8, device=dev)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wb = w_work[:, :, i1:i2].clone()
        hb = hinv[:, i1:i2, i1:i2]
        err = torch.empty_like(wb)
        for j in range(i2 - i1):
            col = wb[:, :, j]
            q = torch.clamp(torch.round(col / s_div), -clip_range, clip_range)
            q_all[:, :, i1 + j] = q.to(torch.int8)
            e = (col - q * s) / hb[:, j, j].unsqueeze(1)
            err[:, :, j] = e
            wb[:, :, j:] -= e.unsqueeze(2) * hb[:, j, j:].unsqueeze(1)
        if i2 < cols:
            w_work[:, :, i2:] -= torch.bmm(err, hinv[:, i1:i2, i2:])
    q_all = torch.gather(q_all, 2, invperm.unsqueeze(1).expand(-1, rows, -1))
    return q_all.contiguous(), scale.contiguous()


def _scheme(
    name: str,
    t: Tensor,
    max_pt: int = PASSTHROUGH_MAX_NUMEL,
    clips: tuple[float, float] = (MATRIX_CLIP_SIGMAS, EMBED_CLIP_SIGMAS),
) -> tuple[int, float] | None:
    """(bits, clip_sigmas) for a tensor that GPTQ quantises, None for passthrough (SPEC §7.1).

    clips = (matrix, embedding) SDClip k: the size/error trade-off (compressed size ~ b - log2 k)."""
    if not t.is_floating_point() or t.numel() <= max_pt:
        return None
    if t.ndim != 2:
        raise ValueError(
            f"quantise: {name} has {t.numel()} elements but shape {tuple(t.shape)}; "
            "large tensors must be 2-D (pass the unbanked state dict)"
        )
    return (EMBED_BITS, clips[1]) if name == EMBED_NAME else (MATRIX_BITS, clips[0])


@torch.no_grad()
def quantize_state_dict(
    state_dict: dict[str, Tensor],
    hessians: dict[str, Tensor] | None,
    method: str = "gptq",
    block_size: int = BLOCK_SIZE,
    passthrough_max_numel: int = PASSTHROUGH_MAX_NUMEL,
    matrix_clip_sigmas: float = MATRIX_CLIP_SIGMAS,
    embed_clip_sigmas: float = EMBED_CLIP_SIGMAS,
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Quantise an unbanked state dict: (tensors, meta), the payload of the artifact.

    tensors: ``name + ".q"`` (int8, int6 values in int8 containers) and ``name + ".scale"`` (fp16 per
    row) for every floating tensor with > 65,536 elements — int6/k=12.85 for the matrices, int8/k=20 for
    ``tok_emb.weight`` — and the tensor itself (fp16 if floating) for everything else. meta[name] is
    ``{"s": "gptq", "b": bits}`` or ``{"s": "pt"}``. ``method="rtn"`` uses round-to-nearest with the
    same scales (no Hessians needed). ``passthrough_max_numel`` is the record's 65,536; tests lower it
    to exercise GPTQ on tiny models. Matrices that share a Hessian are quantised together by stacking
    rows; same-shape groups are batched (the result per matrix is that of :func:`gptq_quantize`).
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    clips = (matrix_clip_sigmas, embed_clip_sigmas)
    tensors: dict[str, Tensor] = {}
    meta: dict[str, object] = {}
    groups: dict[tuple, list[list[str]]] = {}  # (bits, k, rows, cols) -> list of name-lists sharing an H
    by_hessian: dict[int, list[str]] = {}
    for name, t in state_dict.items():
        t = t.detach()
        sch = _scheme(name, t, passthrough_max_numel, clips)
        if sch is None:
            tensors[name] = (t.to(torch.float16) if t.is_floating_point() else t).cpu().contiguous()
            meta[name] = {"s": "pt"}
            continue
        meta[name] = {"s": "gptq", "b": sch[0]}
        if method == "rtn":
            q, s = rtn_quantize(t, sch[1], 2 ** (sch[0] - 1) - 1)
            tensors[name + ".q"], tensors[name + ".scale"] = q.cpu(), s.cpu()
            continue
        if hessians is None or name not in hessians:
            raise KeyError(f"quantize_state_dict: no Hessian for {name}; collect_hessians must observe it")
        by_hessian.setdefault(id(hessians[name]), []).append(name)
    for names in by_hessian.values():
        sch = _scheme(names[0], state_dict[names[0]], passthrough_max_numel, clips)
        rows = sum(state_dict[n].shape[0] for n in names)
        for n in names[1:]:
            same = _scheme(n, state_dict[n], passthrough_max_numel, clips) == sch
            if not same or state_dict[n].shape[1] != state_dict[names[0]].shape[1]:
                raise ValueError(f"{names[0]} and {n} share a Hessian but not a shape/quantisation scheme")
        key = (sch[0], sch[1], rows, state_dict[names[0]].shape[1])
        groups.setdefault(key, []).append(names)
    for (bits, k, _rows, _cols), members in groups.items():
        w = torch.stack([torch.cat([state_dict[n].detach().float() for n in names]) for names in members])
        h = torch.stack([hessians[names[0]] for names in members])
        q, s = gptq_quantize_batched(
            w, h, k, 2 ** (bits - 1) - 1, block_size, names=[n for ns in members for n in ns]
        )
        for b, names in enumerate(members):
            r0 = 0
            for n in names:
                r1 = r0 + state_dict[n].shape[0]
                tensors[n + ".q"] = q[b, r0:r1].cpu().contiguous()
                tensors[n + ".scale"] = s[b, r0:r1].cpu().contiguous()
                r0 = r1
    return tensors, meta


def dequantize_state_dict(
    tensors: dict[str, Tensor], meta: dict[str, object], template: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Inverse of :func:`quantize_state_dict`; dtypes follow ``template`` (fp32 when absent)."""
    out: dict[str, Tensor] = {}
    for name, info in meta.items():
        dtype = template[name].dtype if template is not None and name in template else torch.float32
        if info["s"] == "pt":
            t = tensors[name]
            out[name] = t.to(dtype) if t.is_floating_point() else t
        else:
            out[name] = dequantize(tensors[name + ".q"], tensors[name + ".scale"], dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# Container (SPEC §7.4)
# ---------------------------------------------------------------------------------------------------


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """b"BSHF" + stride byte + the bytes at offsets ≡ 0 (mod stride), then ≡ 1, ... (int8 values and
    their fp16/metadata neighbours separate into more compressible runs)."""
    if not 1 <= stride <= 255:
        raise ValueError(f"byte_shuffle: stride must be in 1..255, got {stride}")
    src = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(src[p::stride].tobytes() for p in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    if len(data) < 5 or data[:4] != SHUFFLE_MAGIC or data[4] == 0:
        raise ValueError("byte_unshuffle: missing BSHF header")
    stride = data[4]
    payload = np.frombuffer(data, dtype=np.uint8, offset=5)
    out = np.empty_like(payload)
    off = 0
    for p in range(stride):
        view = out[p::stride]
        view[:] = payload[off : off + len(view)]
        off += len(view)
    return out.tobytes()


def brotli_segments_compress(data: bytes, segments: int = BROTLI_SEGMENTS) -> bytes:
    """Brotli-11 of ``segments`` equal contiguous slices, compressed in parallel threads (the binding
    releases the GIL): b"GBQ1" + u8 n + n x u32-LE compressed lengths + u32 CRC-32 of the streams
    (Brotli has no checksum: a flipped byte can decode to wrong weights silently) + the n streams.

    One Brotli-11 stream of the record's 36 MB payload takes ~80 s on the H100 machine's CPU; 16
    independent slices take a fraction of that on its 16 cores. Slicing costs next to nothing: on a
    record-size payload 8 slices cost +266 B over one stream, and on the artifact of a record-config
    H100 run 16 slices were 1,874 B smaller than 8. The count is fixed, so the size never depends on
    the machine.
    """
    bounds = [len(data) * i // segments for i in range(segments + 1)]
    parts = [data[bounds[i] : bounds[i + 1]] for i in range(segments)]
    with ThreadPoolExecutor(max(1, min(segments, os.cpu_count() or 1))) as ex:
        streams = list(ex.map(lambda b: brotli.compress(b, quality=BROTLI_QUALITY), parts))
    body = b"".join(streams)
    lengths = (len(s) for s in streams)
    return SEGMENTS_MAGIC + struct.pack(f"<B{segments}II", segments, *lengths, zlib.crc32(body)) + body


def brotli_segments_decompress(blob: bytes) -> bytes:
    if len(blob) < 5 or blob[:4] != SEGMENTS_MAGIC:
        raise ValueError("missing GBQ1 header")
    n = blob[4]
    head = 5 + 4 * n + 4
    if n == 0 or len(blob) < head:
        raise ValueError(f"truncated segment table ({len(blob)} bytes)")
    *lengths, crc = struct.unpack(f"<{n}II", blob[5:head])
    if head + sum(lengths) != len(blob):
        raise ValueError(f"segment lengths sum to {head + sum(lengths)} bytes, file has {len(blob)}")
    if zlib.crc32(memoryview(blob)[head:]) != crc:
        raise ValueError("CRC-32 mismatch: the compressed streams were altered")
    offsets = [head + sum(lengths[:i]) for i in range(n)]
    parts = [blob[o : o + ln] for o, ln in zip(offsets, lengths)]
    with ThreadPoolExecutor(max(1, min(n, os.cpu_count() or 1))) as ex:
        return b"".join(ex.map(brotli.decompress, parts))


def pack_artifact(tensors: dict[str, Tensor], meta: dict[str, object]) -> bytes:
    """torch.save({'w': tensors, 'm': meta}) -> byte shuffle (stride 2) -> Brotli quality 11 (in
    :data:`BROTLI_SEGMENTS` parallel slices, see :func:`brotli_segments_compress`)."""
    buf = io.BytesIO()
    torch.save({"w": tensors, "m": meta}, buf)
    return brotli_segments_compress(byte_shuffle(buf.getvalue(), 2))


def rebuild_hint(path: str | os.PathLike) -> str:
    """The command that writes the artifact at ``path`` again: evaluating the newest checkpoint of its run
    (train.py rebuilds the artifact from its EMA weights), else training its run again."""
    path = Path(path)
    ckpts = sorted(path.parent.glob("ckpt/step_*/meta.json"))
    if ckpts:
        return f"python train.py --eval-only {ckpts[-1].parent} (rebuilds it from that checkpoint of its run)"
    from .run_config import run_preset

    try:
        preset = run_preset("record", path if path.is_file() else None, None)
    except SystemExit:  # an unreadable config.json beside it: the command is a hint, not a check
        preset = "record"
    return f"python train.py --preset {preset} (trains its run again: it left no checkpoint to rebuild from)"


def unpack_artifact(blob: bytes, source: str = "<bytes>") -> tuple[dict[str, Tensor], dict[str, object]]:
    """Inverse of :func:`pack_artifact`; raises :class:`ArtifactError` naming ``source`` on bad input."""
    try:
        raw = byte_unshuffle(brotli_segments_decompress(blob))
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # brotli.error, ValueError, pickle/zip errors from torch.load
        raise ArtifactError(
            f"{source}: not a readable golfbench artifact ({len(blob)} bytes; {type(e).__name__}: {e}). "
            f"The file is corrupt or truncated; write it again: {rebuild_hint(source)}"
        ) from e
    if not isinstance(obj, dict) or set(obj) != {"w", "m"}:
        raise ArtifactError(f"{source}: artifact payload is not {{'w': tensors, 'm': meta}}")
    return obj["w"], obj["m"]


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, object]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: artifact not found (train.py writes it after training)")
    return unpack_artifact(path.read_bytes(), source=str(path))


def next_matrix_clip_sigmas(
    k: float, excess_bytes: int, n_matrix_elements: int, margin: float = 1.1
) -> float:
    """The int6 SDClip k expected to remove ``excess_bytes`` from the compressed artifact.

    Widening the quantisation step by a factor r saves about log2(r) bits per element of a smooth
    weight distribution, so r = 2**(8 * excess / n). Measured on the record model: +1% of k saves
    57 KB, the formula says 56.9 KB. ``margin`` over-shoots a little so that one retry usually fits;
    the step is at least 0.1% so that a few bytes over still make progress.
    """
    if n_matrix_elements <= 0:
        raise ValueError("no int6 matrix to trade size for error: cannot shrink the artifact")
    return k * max(2 ** (margin * 8 * excess_bytes / n_matrix_elements), 1.001)


def save_artifact(
    model: torch.nn.Module,
    hessians: dict[str, Tensor] | None,
    path: str | os.PathLike,
    method: str = "gptq",
    passthrough_max_numel: int = PASSTHROUGH_MAX_NUMEL,
    matrix_clip_sigmas: float = MATRIX_CLIP_SIGMAS,
    embed_clip_sigmas: float = EMBED_CLIP_SIGMAS,
    max_model_bytes: int | None = None,
    max_fit_attempts: int = 4,
) -> dict[str, object]:
    """Quantise ``model.unbanked_state_dict()`` and write the compressed artifact atomically.

    With ``max_model_bytes`` (the cap minus the code bytes), a blob that is too large is re-quantised
    with a larger int6 k (:func:`next_matrix_clip_sigmas`; the int8 embedding keeps its k), at most
    ``max_fit_attempts`` quantisations in all. The smallest blob is written either way; ``fits`` says
    whether it is within the budget. Returns dict(path, model_bytes, matrix_clip_sigmas (the k used),
    fit_attempts, fits, n_quantized, n_passthrough, quantize_s, compress_s).
    """
    if max_fit_attempts < 1:
        raise ValueError(f"max_fit_attempts must be >= 1, got {max_fit_attempts}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    state_dict = model.unbanked_state_dict()
    k, quantize_s, compress_s = matrix_clip_sigmas, 0.0, 0.0
    for attempt in range(1, max_fit_attempts + 1):
        t0 = time.perf_counter()
        tensors, meta = quantize_state_dict(
            state_dict,
            hessians,
            method=method,
            passthrough_max_numel=passthrough_max_numel,
            matrix_clip_sigmas=k,
            embed_clip_sigmas=embed_clip_sigmas,
        )
        sync()
        t1 = time.perf_counter()
        blob = pack_artifact(tensors, meta)
        quantize_s, compress_s = quantize_s + t1 - t0, compress_s + time.perf_counter() - t1
        excess = 0 if max_model_bytes is None else len(blob) - int(max_model_bytes)
        if excess <= 0 or attempt == max_fit_attempts:
            break
        n_matrix = sum(state_dict[n].numel() for n, m in meta.items() if m.get("b") == MATRIX_BITS)
        k = next_matrix_clip_sigmas(k, excess, n_matrix)
    with atomic_write(path) as f:
        f.write(blob)
    n_q = sum(1 for m in meta.values() if m["s"] == "gptq")
    return {
        "path": str(path),
        "model_bytes": len(blob),
        "matrix_clip_sigmas": k,
        "fit_attempts": attempt,
        "fits": excess <= 0,
        "n_quantized": n_q,
        "n_passthrough": len(meta) - n_q,
        "quantize_s": quantize_s,
        "compress_s": compress_s,
    }


def load_artifact(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Read, dequantise (dtypes of the model's own unbanked state dict) and load into ``model``."""
    tensors, meta = read_artifact(path)
    template = model.unbanked_state_dict()
    missing = sorted(set(template) - set(meta))
    if missing:
        raise ArtifactError(
            f"{path}: artifact lacks {len(missing)} tensors of this model, e.g. {missing[:3]}"
        )
    sd = dequantize_state_dict(tensors, meta, template)
    model.load_unbanked_state_dict(sd)
    return model


# ---------------------------------------------------------------------------------------------------
# The cap (SPEC §7.5); the code bytes come from model/run/shipped_code.py
# ---------------------------------------------------------------------------------------------------


def size_report(code_bytes: int, model_bytes: int, cap: int = CAP_BYTES, strict: bool = False) -> dict:
    """artifact_bytes = code_bytes + model_bytes against the cap; status "PASS" or "FAIL".

    With ``strict=True`` a FAIL raises :class:`ArtifactTooLarge` (the report is in its message).
    """
    total = int(code_bytes) + int(model_bytes)
    report = {
        "code_bytes": int(code_bytes),
        "model_bytes": int(model_bytes),
        "artifact_bytes": total,
        "cap_bytes": int(cap),
        "headroom_bytes": int(cap) - total,
        "status": "PASS" if total <= cap else "FAIL",
    }
    if strict and report["status"] == "FAIL":
        raise ArtifactTooLarge(
            f"artifact {total:,} B (code {code_bytes:,} + model {model_bytes:,}) "
            f"exceeds the cap of {cap:,} B "
            f"by {total - cap:,} B: raise the SDClip k (MATRIX_CLIP_SIGMAS) or shrink the model/code"
        )
    return report
