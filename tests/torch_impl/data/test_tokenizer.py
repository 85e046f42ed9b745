"""Tests for torch_impl/data/tokenizer.py: byte and BPE tokenizers, save/load."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_impl.data.tokenizer import BOS, ByteTokenizer, load_tokenizer, save_tokenizer

SAMPLES = ["", "hello world", "héllo wörld ∑ 😀\r\n\ttabs", f"literal {BOS} is text", "x" * 1000]


@given(st.text())
def test_byte_roundtrip_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode_np(text), np.array(ids, dtype=np.uint16))
    assert tok.encode_np(text).dtype == np.uint16


def test_byte_specials_and_errors():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id) == (257, 256)
    assert tok.decode([256, 104, 256, 105]) == "hi"  # specials skipped
    assert tok.decode(np.array([0xE2, 0x82])) == "\ufffd"  # cut character -> replacement
    assert tok.encode(BOS) == list(BOS.encode())  # the literal string is text, not the special
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])
    lengths = tok.token_byte_lengths()
    assert len(lengths) == 257 and lengths[256] == 0 and set(lengths[:256]) == {1}


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    from torch_impl.data.corpus import load_corpus
    from torch_impl.data.tokenizer import BPETokenizer

    return BPETokenizer.train(load_corpus(max_bytes=200_000), vocab_size=600)


def test_bpe_trains_and_roundtrips(bpe):
    assert 257 < bpe.vocab_size <= 600
    assert bpe.decode([bpe.bos_id]) == ""
    for s in SAMPLES:
        ids = bpe.encode(s)
        assert bpe.bos_id not in ids  # the literal "<|bos|>" never becomes the special
        assert bpe.decode(ids) == s
        assert bpe.encode_np(s).tolist() == ids
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(s) for s in SAMPLES]
    # merges were learned: code compresses below one token per byte
    code = "def __init__(self, name):\n    self.name = name\n"
    assert len(bpe.encode(code)) < len(code.encode()) / 2


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bpe_roundtrip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_token_byte_lengths(bpe):
    lengths = bpe.token_byte_lengths()
    assert len(lengths) == bpe.vocab_size and lengths[bpe.bos_id] == 0
    for s in SAMPLES:
        assert sum(lengths[i] for i in bpe.encode(s)) == len(s.encode("utf-8"))


def test_bpe_save_load(bpe, tmp_path):
    from torch_impl.data.tokenizer import BPETokenizer

    bpe.save(tmp_path / "bpe.json")
    again = BPETokenizer.load(tmp_path / "bpe.json")
    assert (again.vocab_size, again.bos_id) == (bpe.vocab_size, bpe.bos_id)
    for s in SAMPLES:
        assert again.encode(s) == bpe.encode(s)


def test_bpe_vocab_size_too_small():
    pytest.importorskip("tokenizers")
    from torch_impl.data.tokenizer import BPETokenizer

    with pytest.raises(ValueError, match="257"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_save_load_tokenizer_byte(tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path)
    assert json.loads((tmp_path / "tokenizer_meta.json").read_text())["kind"] == "byte"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_save_load_tokenizer_bpe(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path / "ckpt")
    again = load_tokenizer(tmp_path / "ckpt")
    assert again.kind == "bpe" and again.encode(SAMPLES[2]) == bpe.encode(SAMPLES[2])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_meta.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="sentencepiece"):
        load_tokenizer(tmp_path)
