"""Tests for torch_impl/data/loader.py: split, token stream, distributed loader, bits per byte."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_impl.data.loader import (
    DistributedTokenLoader,
    bits_per_byte,
    bpb_sums,
    split_documents,
    token_bytes,
    tokenize_documents,
)
from torch_impl.data.tokenizer import ByteTokenizer

# -----------------------------------------------------------------------------
# split

@given(st.integers(2, 300), st.floats(0.001, 0.999))
def test_split_is_disjoint_covering_and_ordered(n, frac):
    docs = [f"doc{i}" for i in range(n)]
    train, val = split_documents(docs, frac)
    assert not set(train) & set(val)
    assert sorted(train + val, key=lambda d: int(d[3:])) == docs
    assert train == [d for d in docs if d in set(train)]  # corpus order kept
    assert len(val) == min(max(round(n * frac), 1), n - 1)
    assert split_documents(docs, frac) == (train, val)  # deterministic


def test_split_spreads_val_through_the_corpus():
    _, val = split_documents([str(i) for i in range(100)], 0.1)
    assert [int(v) for v in val] == list(range(9, 100, 10))


def test_split_errors():
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["only one"], 0.5)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            split_documents(["a", "b"], bad)


# -----------------------------------------------------------------------------
# token stream

def test_tokenize_documents_prefixes_bos():
    tok = ByteTokenizer()
    stream = tokenize_documents(["ab", "", "é"], tok)
    assert stream.dtype == np.uint16
    assert stream.tolist() == [256, 97, 98, 256, 256, 0xC3, 0xA9]


def test_tokenize_documents_bpe():
    pytest.importorskip("tokenizers")
    from torch_impl.data.tokenizer import BPETokenizer

    docs = ["def f(x):\n    return x\n", "class A:\n    pass\n"] * 20
    tok = BPETokenizer.train(docs, vocab_size=300)
    stream = tokenize_documents(docs[:2], tok)
    expected = [tok.bos_id, *tok.encode(docs[0]), tok.bos_id, *tok.encode(docs[1])]
    assert stream.tolist() == expected


# -----------------------------------------------------------------------------
# loader

def stream(n):
    # distinct values (mod 2^16 but n stays small) make every window identifiable
    return np.arange(n, dtype=np.uint16)


def test_targets_are_inputs_shifted():
    tokens = stream(1000)
    x, y = next(DistributedTokenLoader(tokens, batch_size=3, seq_len=8))
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    flat = torch.from_numpy(tokens[: 3 * 8 + 1].astype(np.int64))
    assert torch.equal(x.flatten(), flat[:-1]) and torch.equal(y.flatten(), flat[1:])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_disjoint_and_cover_single_process(world_size):
    B, T, steps = 2, 5, 7
    tokens = stream(500)  # 500 // (world_size*B*T) steps per epoch, so this also wraps
    single = DistributedTokenLoader(tokens, B, T)
    single_batches = [next(single) for _ in range(steps * world_size)]
    loaders = [DistributedTokenLoader(tokens, B, T, rank=r, world_size=world_size) for r in range(world_size)]
    for s in range(steps):
        per_rank = [next(ld) for ld in loaders]
        seen = torch.cat([x.flatten() for x, _ in per_rank])
        assert len(set(seen.tolist())) == world_size * B * T  # disjoint within the step
        for r, (x, y) in enumerate(per_rank):
            sx, sy = single_batches[s * world_size + r]
            assert torch.equal(x, sx) and torch.equal(y, sy)
    assert len({ld.epoch for ld in loaders}) == 1  # lockstep


def test_wraparound_counts_epochs():
    B, T = 2, 4
    tokens = stream(B * T * 3 + 5)  # 3 full steps, then a tail too short for a 4th
    loader = DistributedTokenLoader(tokens, B, T)
    first = [next(loader) for _ in range(3)]
    assert loader.epoch == 0
    x, y = next(loader)
    assert loader.epoch == 1 and torch.equal(x, first[0][0]) and torch.equal(y, first[0][1])


def test_state_dict_resume_is_exact():
    tokens = stream(1000)  # 7 steps of 2*4*16 tokens per epoch
    a = DistributedTokenLoader(tokens, 4, 16, rank=1, world_size=2)
    for _ in range(13):  # long enough to wrap once
        next(a)
    state = a.state_dict()
    assert state["epoch"] >= 1
    expected = [next(a) for _ in range(10)]
    b = DistributedTokenLoader(tokens, 4, 16, rank=1, world_size=2)
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (next(b) for _ in range(10))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    assert a.state_dict() == b.state_dict()


def test_resume_on_another_stream_errors():
    a = DistributedTokenLoader(stream(100), 2, 4)
    b = DistributedTokenLoader(stream(101), 2, 4)
    with pytest.raises(ValueError, match="100 tokens.*101"):
        b.load_state_dict(a.state_dict())


def test_too_short_stream_error_names_sizes():
    with pytest.raises(ValueError, match=r"too short: 40 tokens.*2\*4\*5 \+ 1 = 41"):
        DistributedTokenLoader(stream(40), batch_size=4, seq_len=5, rank=0, world_size=2)
    DistributedTokenLoader(stream(41), batch_size=4, seq_len=5, rank=1, world_size=2)  # exactly enough


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(stream(100), 2, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        DistributedTokenLoader(stream(100), 2, 0)
    with pytest.raises(ValueError, match="1-D integer"):
        DistributedTokenLoader(np.zeros((10, 10), dtype=np.int32), 2, 4)


# -----------------------------------------------------------------------------
# bits per byte

def test_token_bytes_byte_tokenizer():
    tb = token_bytes(ByteTokenizer())
    assert tb.shape == (257,) and tb.dtype == torch.int64
    assert tb[:256].eq(1).all() and tb[256] == 0


def test_bits_per_byte_hand_computation():
    # a toy vocab: id 0 is a special (0 bytes), ids 1..3 stand for 1, 2 and 3 bytes
    tb = torch.tensor([0, 1, 2, 3])
    targets = torch.tensor([[1, 0, 3], [2, -1, 3]])  # -1 = ignore_index
    losses = torch.tensor([[0.5, 9.0, 1.5], [2.0, 7.0, 3.0]])
    nats, nbytes = bpb_sums(losses, targets, tb)
    # specials and ignored targets drop out: nats 0.5 + 1.5 + 2 + 3 = 7, bytes 1 + 3 + 2 + 3 = 9
    assert nats.item() == pytest.approx(7.0) and nbytes.item() == 9
    assert bits_per_byte(nats, nbytes) == pytest.approx(7.0 / (math.log(2) * 9))


def test_bits_per_byte_sums_accumulate_and_match_cross_entropy():
    torch.manual_seed(0)
    tb = token_bytes(ByteTokenizer())
    logits = torch.randn(2, 6, 257)
    targets = torch.randint(0, 257, (2, 6))
    targets[0, 0] = 256  # a BOS target
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 6)
    n0, b0 = bpb_sums(losses[:1], targets[:1], tb)
    n1, b1 = bpb_sums(losses[1:], targets[1:], tb)
    # byte tokens are 1 byte each, so bpb is the mean loss over non-BOS targets in bits
    mask = targets != 256
    assert bits_per_byte(n0 + n1, b0 + b1) == pytest.approx(losses[mask].mean().item() / math.log(2))


def test_bits_per_byte_errors():
    with pytest.raises(ValueError, match="bytes is 0"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="same shape"):
        bpb_sums(torch.zeros(3), torch.zeros(4, dtype=torch.int64), torch.ones(5))
