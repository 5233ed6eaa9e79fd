"""model.metrics: SPEC 2.4 byte tables, bits per byte, and the audit that catches the known LUT bugs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

from model import data, metrics
from model.metrics import SPACE, ByteAuditError, ByteLUTs

# Not in a small tokenizer's vocabulary, so it exercises byte fallback; digits, punctuation and a space
# before "(" exercise split digits and the standalone "▁" piece. Invariant under nmt_nfkc normalisation.
KNOWN_TEXT = "The quick brown fox (said 2024 times): naïve café, 漢字 😀 ok"


@pytest.fixture(scope="module")
def docs():
    return data.StdlibCorpus(max_files=30).documents()


@pytest.fixture(scope="module")
def sp(docs):
    return spm.SentencePieceProcessor(model_proto=data.train_tokenizer(docs, 512))


def _stream(sp, texts) -> np.ndarray:
    out = []
    for t in texts:
        out += [sp.bos_id()] + sp.encode(t)
    return np.array(out, dtype=np.int64)


def test_luts_follow_the_spec_table(sp):
    base, space, boundary = metrics.build_byte_luts(sp, 600)
    assert base.dtype == torch.int16 and space.dtype == boundary.dtype == torch.bool
    assert base.numel() == 600  # max(sp vocab 512, 600); ids >= 512 are boundaries with 0 bytes
    assert not base[512:].any() and not space[512:].any() and boundary[512:].all()
    kinds = {"control": 0, "byte": 0, "spaced": 0, "plain": 0}
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            kinds["control"] += 1
            assert (base[i], space[i], boundary[i]) == (0, False, True), piece
        elif sp.is_byte(i):
            kinds["byte"] += 1
            assert (base[i], space[i], boundary[i]) == (1, False, False), piece
        elif piece.startswith(SPACE):
            kinds["spaced"] += 1
            assert (base[i], space[i], boundary[i]) == (len(piece[1:].encode()), True, False), piece
        else:
            kinds["plain"] += 1
            assert (base[i], space[i], boundary[i]) == (len(piece.encode()), False, False), piece
    assert kinds["control"] == 4 and kinds["byte"] == 256 and min(kinds.values()) > 0
    assert metrics.build_byte_luts(sp).base_bytes.numel() == sp.vocab_size()


def test_bytes_of_a_known_text_equal_its_utf8_length(sp):
    assert sp.decode(sp.encode(KNOWN_TEXT)) == KNOWN_TEXT  # precondition: the tokenizer round-trips it
    pieces = [sp.id_to_piece(i) for i in sp.encode(KNOWN_TEXT)]
    assert SPACE in pieces and any(p.startswith("<0x") for p in pieces)  # the hard cases are exercised
    w = _stream(sp, [KNOWN_TEXT])
    counter = metrics.ByteCounter(sp)
    assert counter.count(w[:-1], w[1:]) == len(KNOWN_TEXT.encode("utf-8"))
    assert counter.count(torch.from_numpy(w[:-1]), torch.from_numpy(w[1:])) == len(KNOWN_TEXT.encode())


def test_byte_count_over_documents_and_batches(sp, docs):
    texts = [KNOWN_TEXT, *docs[:20]]
    w = _stream(sp, texts)
    expected = sum(len(sp.decode(sp.encode(t)).encode("utf-8")) for t in texts)
    counter = metrics.ByteCounter(sp, vocab_size=1024)
    assert counter.count(w[:-1], w[1:]) == expected
    # shape-agnostic: the same targets in (B, T) windows, with their true previous tokens as inputs
    T = 37
    usable = (w.size - 1) // T * T
    x, y = torch.from_numpy(w[:usable]).view(-1, T), torch.from_numpy(w[1 : usable + 1]).view(-1, T)
    per_token = counter.token_bytes(x, y)
    assert per_token.shape == (usable // T, T) and per_token.dtype == torch.int32
    assert counter.count(x, y) == counter.count(w[:usable], w[1 : usable + 1]) == int(per_token.sum())
    with pytest.raises(ValueError, match="same shape"):
        counter.count(x[:, 1:], y)


def test_bits_per_byte():
    loss_sum, tokens, nbytes = 12345.678, 5000, 18634
    bpb = metrics.bits_per_byte(loss_sum, nbytes)
    assert bpb == pytest.approx((loss_sum / tokens) / math.log(2) * tokens / nbytes, rel=1e-12)
    with pytest.raises(ValueError, match="byte_count must be positive"):
        metrics.bits_per_byte(1.0, 0)


# ----------------------------------------------------------------------------------------------------------
# Audit: the correct tables pass; each of the bugs that got challenge records removed is caught and named
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_stream(sp, docs):
    # The encoder never puts a "▁" piece right after BOS (it strips leading spaces); a stream may still
    # hold one (e.g. a tokenizer with add_dummy_prefix=True), so one is planted by hand.
    spaced = next(
        i
        for i in range(sp.vocab_size())
        if sp.id_to_piece(i).startswith(SPACE) and not sp.is_byte(i) and len(sp.id_to_piece(i)) > 1
    )
    handmade = np.array([sp.bos_id(), spaced, *sp.encode("and more")], dtype=np.int64)
    return np.concatenate([_stream(sp, [KNOWN_TEXT, *docs[:150]]), handmade, _stream(sp, ["x = f( 1, 2 )"])])


def test_audit_passes_the_spec_tables(sp, audit_stream):
    report = metrics.audit_byte_counts(sp, audit_stream)
    assert report.lut_bytes == report.decoded_bytes > 10_000
    assert report.segments == 152 and report.has_space_piece  # the tail after the last BOS is not audited
    assert metrics.audit_byte_counts(sp, torch.from_numpy(audit_stream)).lut_bytes == report.lut_bytes


def _planted(sp, bug: str) -> ByteLUTs:
    base, space, boundary = (t.clone() for t in metrics.build_byte_luts(sp))
    if bug == "space counted twice":  # base_bytes from the piece with "▁" -> " ", plus the +1 flag
        for i in range(sp.vocab_size()):
            if space[i]:
                base[i] = len(sp.id_to_piece(i).replace(SPACE, " ").encode())
    elif bug == "byte pieces as text":  # "<0xE6>" counted as 6 bytes
        for i in range(sp.vocab_size()):
            if sp.is_byte(i):
                base[i] = len(sp.id_to_piece(i).encode())
    elif bug == "standalone space dropped":  # "▁" stripped to "" and never flagged
        space[sp.piece_to_id(SPACE)] = False
    elif bug == "space id lookup hits unk":  # code that sets up the "▁" entry via piece_to_id on a
        unk = sp.unk_id()  # tokenizer without a standalone "▁" writes into the <unk> row instead
        base[unk], boundary[unk] = 1, False
    elif bug == "BOS not a boundary":
        boundary[sp.bos_id()] = False
    return ByteLUTs(base, space, boundary)


@pytest.mark.parametrize(
    "bug, phrase",
    [
        ("space counted twice", "leading space counted twice"),
        ("byte pieces as text", "byte-fallback pieces counted as their text length"),
        ("standalone space dropped", "standalone '▁' piece is mishandled"),
        ("space id lookup hits unk", "control/unknown piece '<unk>'"),
        ("BOS not a boundary", "'<s>' (id 1) counts 0 bytes, is_boundary=False"),
    ],
)
def test_audit_catches_each_planted_bug(sp, audit_stream, bug, phrase):
    luts = _planted(sp, bug)
    with pytest.raises(ByteAuditError) as err:
        metrics.audit_byte_counts(sp, audit_stream, luts)
    assert phrase in str(err.value), str(err.value)


def test_audit_quantifies_the_count_error(sp, audit_stream):
    luts = _planted(sp, "byte pieces as text")
    counter = metrics.ByteCounter(sp, luts=luts)
    inflated = counter.count(audit_stream[:-1], audit_stream[1:])
    truth = metrics.ByteCounter(sp).count(audit_stream[:-1], audit_stream[1:])
    assert inflated > truth  # the bug lowers the reported bpb: a fake improvement
    with pytest.raises(ByteAuditError, match=r"table [\d,]+ bytes vs decoded [\d,]+ \(\+"):
        metrics.audit_byte_counts(sp, audit_stream, luts)


def test_audit_on_the_corpus_val_stream(tmp_path, docs):
    paths = data.build_corpus(tmp_path, docs, 400)
    sp400 = spm.SentencePieceProcessor(model_file=str(paths.tokenizer_model))
    val = data.load_val_tokens(paths.val_pattern, 64)
    report = metrics.audit_byte_counts(sp400, val, vocab_size=400)
    assert report.lut_bytes == report.decoded_bytes > 0
    assert report.segments >= paths.meta["val_documents"] - 2  # all but the cut tail document
    with pytest.raises(ValueError, match="no boundary"):
        metrics.audit_byte_counts(sp400, val[1:20][val[1:20] != 1])
