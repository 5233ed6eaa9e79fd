"""Bits per byte from SentencePiece pieces (SPEC.md section 2.4) and an audit of the byte count.

The challenge scores a model by bits per UTF-8 byte of the validation text. The byte count comes from
three per-id tables (``build_byte_luts``); for a scored target ``y`` whose input (previous) token is ``x``:

    bytes = base_bytes[y] + (has_leading_space[y] and not is_boundary[x])

``audit_byte_counts`` checks those tables against the tokenizer's own decoder on a token stream and names
the three mistakes that got challenge records removed: the leading space counted twice, the standalone
"▁" piece mishandled (or a tokenizer without one), and byte-fallback pieces counted as their text length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker


class ByteLUTs(NamedTuple):
    base_bytes: torch.Tensor  # int16
    has_leading_space: torch.Tensor  # bool
    is_boundary: torch.Tensor  # bool

    def to(self, device) -> ByteLUTs:
        return ByteLUTs(*(t.to(device) for t in self))


def build_byte_luts(sp, vocab_size: int | None = None, device=None) -> ByteLUTs:
    """The three tables of SPEC 2.4, of size max(sp.vocab_size(), vocab_size).

    base_bytes: 0 for control/unknown/unused ids, 1 for byte-fallback pieces (<0xNN>), else the UTF-8
    length of the piece after stripping one leading "▁". has_leading_space: the piece starts with "▁"
    (byte and control pieces: false). is_boundary: true by default, false for every normal or byte piece
    (so control, unknown, unused and ids >= the tokenizer's vocabulary are boundaries).
    """
    n_sp = int(sp.vocab_size())
    size = max(n_sp, vocab_size or 0)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(
        torch.from_numpy(base).to(device),
        torch.from_numpy(space).to(device),
        torch.from_numpy(boundary).to(device),
    )


class ByteCounter:
    """UTF-8 bytes that scored targets stand for: ``ByteCounter(sp).count(inputs, targets)``.

    ``inputs``/``targets`` are same-shape integer tensors (any device) or numpy arrays; ``inputs[i]`` is the
    token before ``targets[i]`` (for a window w: inputs = w[:-1], targets = w[1:]).
    """

    def __init__(self, sp, vocab_size: int | None = None, luts: ByteLUTs | None = None):
        self.luts = luts if luts is not None else build_byte_luts(sp, vocab_size)
        self._on: dict[str, ByteLUTs] = {"cpu": self.luts.to("cpu")}

    def _luts_on(self, device: torch.device) -> ByteLUTs:
        key = str(device)
        if key not in self._on:
            self._on[key] = self.luts.to(device)
        return self._on[key]

    def token_bytes(self, inputs, targets):
        """Per-target byte counts (int32), same shape and kind (tensor / numpy) as ``targets``."""
        as_numpy = isinstance(targets, np.ndarray)
        x = torch.as_tensor(np.asarray(inputs, dtype=np.int64)) if as_numpy else inputs.long()
        y = torch.as_tensor(np.asarray(targets, dtype=np.int64)) if as_numpy else targets.long()
        if x.shape != y.shape:
            raise ValueError(f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} must have the same shape")
        base, space, boundary = self._luts_on(y.device)
        out = base[y].to(torch.int32) + (space[y] & ~boundary[x]).to(torch.int32)
        return out.numpy() if as_numpy else out

    def count(self, inputs, targets) -> int:
        t = self.token_bytes(inputs, targets)
        return (
            int(t.sum(dtype=np.int64)) if isinstance(t, np.ndarray) else int(t.sum(dtype=torch.int64).item())
        )


def bits_per_byte(loss_sum_nats: float, byte_count: int) -> float:
    """Summed natural-log cross-entropy over the scored tokens -> bits per UTF-8 byte."""
    if byte_count <= 0:
        raise ValueError(f"byte_count must be positive, got {byte_count} (no text was scored)")
    return float(loss_sum_nats) / (math.log(2.0) * float(byte_count))


# ----------------------------------------------------------------------------------------------------------
# Audit
# ----------------------------------------------------------------------------------------------------------


class ByteAuditError(AssertionError):
    """The byte tables disagree with the tokenizer's decoder; the message says which pieces and why."""


@dataclass
class ByteAudit:
    segments: int  # runs of text between boundary tokens, compared one by one with the decoder
    targets: int  # scored positions covered (stream length - 1, minus unaudited ends)
    lut_bytes: int
    decoded_bytes: int
    has_space_piece: bool  # the tokenizer has a standalone "▁" piece ([1493] asserts it)


def _decoded_len(sp, ids) -> int:
    return len(sp.decode([int(i) for i in ids]).encode("utf-8"))


def _oracle_tables(sp, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes each id decodes to: mid-text (after an ordinary piece) and right after a boundary."""
    n_sp = int(sp.vocab_size())
    mid = np.zeros(n, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    anchor = sp.piece_to_id("<0x61>")  # "a" as a byte piece: a neutral left context for any piece
    if not sp.is_byte(anchor):
        anchor = next(
            i
            for i in range(n_sp)
            if not (
                sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.id_to_piece(i).startswith(SPACE)
            )
        )
    base_len = _decoded_len(sp, [anchor])
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        if sp.is_byte(i):  # one byte by definition; runs of them are checked against decode per segment
            mid[i] = first[i] = 1
            continue
        mid[i] = _decoded_len(sp, [anchor, i]) - base_len
        first[i] = _decoded_len(sp, [i])
    return mid, first


def _kind(sp, i: int) -> str:
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return "control"
    if sp.is_byte(i):
        return "byte"
    piece = sp.id_to_piece(i)
    return "space" if piece == SPACE else "spaced" if piece.startswith(SPACE) else "plain"


def _diagnose(sp, luts: ByteLUTs, ids: np.ndarray) -> list[str]:
    """Name the classes of ids (among ``ids``) whose table entries disagree with the decoder."""
    base = luts.base_bytes.cpu().numpy().astype(np.int64)
    space = luts.has_leading_space.cpu().numpy()
    boundary = luts.is_boundary.cpu().numpy()
    mid, first = _oracle_tables(sp, base.size)
    lut_mid, lut_first = base + space, base  # bytes mid-text / right after a boundary
    by_kind: dict[str, list[int]] = {}
    for i in np.unique(ids[ids < int(sp.vocab_size())]).tolist():
        by_kind.setdefault(_kind(sp, i), []).append(i)

    def show(i: int) -> str:
        return (
            f"{sp.id_to_piece(i)!r} (id {i}) counts {lut_mid[i]} bytes mid-text and {lut_first[i]} after a "
            f"boundary, the decoder gives {mid[i]} and {first[i]}"
        )

    problems: list[str] = []
    reported: set[int] = set()
    bad = [i for i in by_kind.get("byte", []) if lut_mid[i] != 1 or boundary[i]]
    if bad:
        reported.update(bad)
        problems.append(
            f"byte-fallback pieces counted as their text length ({len(bad)} ids), e.g. {show(bad[0])}: "
            "a <0xNN> piece is 1 byte (base_bytes = 1 for sp.is_byte(id))"
        )
    bad = [i for i in by_kind.get("control", []) if base[i] != 0 or space[i] or not boundary[i]]
    if bad:
        reported.update(bad)
        i = bad[0]
        hint = (
            " (piece_to_id('▁') returns unk_id when a tokenizer has no '▁' piece)" if sp.is_unknown(i) else ""
        )
        problems.append(
            f"control/unknown piece {sp.id_to_piece(i)!r} (id {i}) counts {base[i]} bytes, "
            f"is_boundary={bool(boundary[i])}: it must count 0 and be a boundary{hint}"
        )
    bad = [i for i in by_kind.get("spaced", []) if lut_mid[i] == mid[i] + 1]
    if bad:
        reported.update(bad)
        problems.append(
            f"leading space counted twice ({len(bad)} '▁' pieces), e.g. {show(bad[0])}: base_bytes must "
            "exclude the '▁'; has_leading_space adds that byte"
        )
    bad = [i for i in by_kind.get("space", []) if lut_mid[i] != mid[i] or lut_first[i] != first[i]]
    if bad:
        reported.update(bad)
        problems.append(
            f"the standalone '▁' piece is mishandled: {show(bad[0])}; it is one space byte unless it "
            "follows a boundary"
        )
    rest = [
        i
        for k in ("spaced", "plain")
        for i in by_kind.get(k, [])
        if i not in reported and (lut_mid[i] != mid[i] or lut_first[i] != first[i] or boundary[i])
    ]
    if rest:
        problems.append(f"{len(rest)} other pieces disagree, e.g. {show(rest[0])}")
    space_id = sp.piece_to_id(SPACE)
    if space_id == sp.unk_id() or sp.id_to_piece(space_id) != SPACE:
        problems.append(
            "note: this tokenizer has no standalone '▁' piece (a space before an unmergeable character "
            "becomes the byte piece <0x20>)"
        )
    return problems


def audit_byte_counts(
    sp, tokens, luts: ByteLUTs | None = None, vocab_size: int | None = None, *, check_tables: bool = True
) -> ByteAudit:
    """Compare the table byte count of a token stream with the bytes of its decoded text.

    The stream (e.g. the validation tokens, BOS-separated documents) is cut at boundary tokens (control,
    unknown, unused ids, per the tokenizer); each run of text between two boundaries is decoded with
    ``sp.decode`` and its UTF-8 length compared with the sum of the table bytes of its tokens as scored
    targets. The decoder drops the "▁" of a piece right after a boundary, as the tables do. A run without
    a boundary before it (stream start) or after it (a cut stream's tail, perhaps mid-character) is not
    audited. With ``check_tables`` every id's entries are also compared with the decoder (mid-text and
    right after a boundary), which catches wrong entries the stream never uses. Raises
    ``ByteAuditError`` naming the offending pieces; returns the totals when all agree.
    """
    luts = luts if luts is not None else build_byte_luts(sp, vocab_size)
    toks = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64).reshape(
        -1
    )
    if toks.size < 2:
        raise ValueError("audit needs a stream of at least 2 tokens")
    n_sp = int(sp.vocab_size())
    true_boundary = np.array(
        [sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(n_sp)], dtype=bool
    )
    is_b = np.ones(toks.size, dtype=bool)
    inside = toks < n_sp
    is_b[inside] = true_boundary[toks[inside]]

    base, space, boundary = (t.cpu().numpy() for t in luts)
    if toks.max() >= base.size:
        raise ValueError(f"token id {int(toks.max())} is outside the tables (size {base.size})")
    x, y = toks[:-1], toks[1:]
    count = np.zeros(toks.size, dtype=np.int64)  # count[p]: table bytes of token p as a scored target
    count[1:] = base[y].astype(np.int64) + (space[y] & ~boundary[x])

    bpos = np.flatnonzero(is_b)
    if bpos.size == 0:
        raise ValueError("the stream has no boundary (BOS) token: nothing to audit")
    seg_id = np.cumsum(is_b)  # text after the k-th boundary has id k; k = 0 and k = last are not audited
    text = ~is_b & (seg_id > 0) & (seg_id < bpos.size)
    lut_seg = np.bincount(seg_id[text], weights=count[text], minlength=bpos.size).astype(np.int64)
    scored_boundaries = is_b.copy()
    scored_boundaries[0] = False
    boundary_bytes = int(count[scored_boundaries].sum())

    mismatches = []
    decoded_total = 0
    for k in range(1, bpos.size):
        seg = toks[bpos[k - 1] + 1 : bpos[k]]
        if seg.size == 0:
            continue
        decoded = _decoded_len(sp, seg)
        decoded_total += decoded
        if decoded != lut_seg[k]:
            mismatches.append((k, int(lut_seg[k]), decoded, seg))
    lut_total = int(lut_seg.sum()) + boundary_bytes
    space_id = sp.piece_to_id(SPACE)
    report = ByteAudit(
        segments=int(bpos.size - 1),
        targets=int(text.sum() + scored_boundaries.sum()),
        lut_bytes=lut_total,
        decoded_bytes=decoded_total,
        has_space_piece=bool(space_id != sp.unk_id() and sp.id_to_piece(space_id) == SPACE),
    )
    if mismatches or boundary_bytes:
        stream_ids = np.concatenate([m[3] for m in mismatches] + [toks[is_b]])
        problems = _diagnose(sp, luts, stream_ids)
        head = (
            f"byte tables disagree with the decoder: table {lut_total:,} bytes vs decoded {decoded_total:,} "
            f"({lut_total - decoded_total:+,}, bpb off by {(decoded_total / max(lut_total, 1) - 1):+.2%}) "
            f"in {len(mismatches)} of {report.segments} documents"
        )
        if boundary_bytes:
            head += f"; boundary (BOS/control) targets count {boundary_bytes} bytes, they must count 0"
        if mismatches:
            k, lut, dec, seg = mismatches[0]
            text = sp.decode([int(i) for i in seg])[:60]
            head += f"; first: document {k}, table {lut} vs decoded {dec} bytes for {text!r}"
        raise ByteAuditError(
            head + "\n  - " + "\n  - ".join(problems or ["no single piece class explains it"])
        )
    if check_tables:  # entries this stream did not exercise (e.g. unk, or "▁" right after BOS)
        problems = [p for p in _diagnose(sp, luts, np.arange(n_sp)) if not p.startswith("note:")]
        if problems:
            raise ByteAuditError(
                f"this stream's {lut_total:,} bytes match the decoder, but table entries it does not "
                "exercise are wrong:\n  - " + "\n  - ".join(problems)
            )
    return report


AUDIT_TOKENS = 2**20  # the start-up audit reads the first 1 M validation tokens (~1,300 FineWeb documents)


def audit_run_tables(sp, luts: ByteLUTs, val_tokens, max_tokens: int = AUDIT_TOKENS) -> ByteAudit | None:
    """A run's start-up audit of its byte tables: the first ``max_tokens`` of the validation stream and
    every table entry against the tokenizer's decoder (ByteAuditError naming the pieces when they differ).
    None when that stream has no boundary (BOS) token to cut documents at: nothing can be audited."""
    head = val_tokens[: max_tokens + 1]
    try:
        return audit_byte_counts(sp, head, luts)
    except ByteAuditError:
        raise
    except ValueError as exc:
        if "no boundary" in str(exc):
            return None
        raise
