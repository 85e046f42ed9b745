"""
From documents to (inputs, targets) batches, for one rank of a torchrun job.

The pipeline is:
    docs -> split_documents (train / val, by document)
         -> tokenize_documents (one flat numpy stream, <|bos|> before each doc)
         -> DistributedTokenLoader (B x T windows, a disjoint slice per rank)

plus the bits-per-byte metric, which needs to know how many bytes each token
stands for (token_bytes) so that models with different tokenizers compare.

Everything is deterministic and needs no randomness: the corpus order is fixed,
and so is the walk through the stream. A resumed run restores the loader's
position from its state_dict and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .tokenizer import ByteTokenizer, token_dtype

# -----------------------------------------------------------------------------
# train / validation split

def split_documents(docs: Iterable[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Split by whole documents, so no document straddles train and val.

    n_val = round(n * val_fraction), clamped to [1, n-1], and the validation
    documents are spread evenly through the corpus (doc i is val when
    floor((i+1) * n_val / n) > floor(i * n_val / n)). Spreading, rather than
    taking the tail, matters for the stdlib corpus: its sorted order groups
    whole packages, and the tail alone would be all xml/ and zoneinfo/.
    """
    docs = list(docs)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(docs)
    if n < 2:
        raise ValueError(f"need at least 2 documents to split into train and val, got {n}")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    train, val = [], []
    for i, doc in enumerate(docs):
        (val if (i + 1) * n_val // n > i * n_val // n else train).append(doc)
    return train, val


# -----------------------------------------------------------------------------
# the token stream

def tokenize_documents(docs: Sequence[str], tokenizer) -> np.ndarray:
    """Encode every document, prefix each with <|bos|>, concatenate.

    Returns one contiguous 1-D array in the smallest dtype that holds the vocab
    (uint16 for vocab <= 65536): half the memory of int32, and it can be
    np.save'd and np.load(mmap_mode="r")'d as a cache by the caller.
    """
    docs = list(docs)
    if isinstance(tokenizer, ByteTokenizer):
        # numpy views of the bytes: ~5x faster and far lighter than lists of Python ints
        encoded = [tokenizer.encode_np(d) for d in docs]
    else:
        encoded = tokenizer.encode_batch(docs)  # BPE: batched, parallel in Rust
    total = sum(len(e) + 1 for e in encoded)
    out = np.empty(total, dtype=token_dtype(tokenizer.vocab_size))
    pos = 0
    for ids in encoded:
        out[pos] = tokenizer.bos_id
        out[pos + 1: pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return out


# -----------------------------------------------------------------------------
# the distributed loader

class DistributedTokenLoader:
    """Endless iterator of (inputs, targets), each (B, T) int64 on `device`.

    Layout. The stream is read in steps; one step consumes world_size * B * T
    tokens starting at `position`. Rank r reads the B*T + 1 tokens starting at
    position + r*B*T, reshapes the first B*T into inputs and the last B*T into
    targets (inputs shifted by one). So rank r's chunk at step s is chunk
    s*world_size + r of the stream, which is exactly what a world_size=1 run
    reads at step s*world_size + r: the ranks' inputs are disjoint and, step by
    step, cover the same tokens as a single process would. (The one extra
    target token of a rank is the first input token of the next rank.)

    Wrap-around. When the next step would run past the end of the stream, the
    tail (less than one step) is skipped, `epoch` goes up by one, and reading
    restarts at 0. Every rank does the same arithmetic on the same stream
    length, so ranks stay in lockstep without communicating.

    Resuming. state_dict() is taken after a batch has been yielded and holds the
    position of the next step; load_state_dict() continues from there.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu"):
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        self.tokens = tokens  # may be a np.memmap; only the windows we read are touched
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.step_tokens = world_size * batch_size * seq_len
        if len(tokens) < self.step_tokens + 1:
            raise ValueError(
                f"token stream too short: {len(tokens)} tokens, but one step needs "
                f"world_size*batch_size*seq_len + 1 = {world_size}*{batch_size}*{seq_len} + 1 "
                f"= {self.step_tokens + 1}; use more data or a smaller batch/sequence"
            )
        # pinned host memory lets the host->device copy run asynchronously
        self._pin = self.device.type == "cuda"
        self.position = 0
        self.epoch = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.step_tokens + 1 > len(self.tokens):
            self.position = 0
            self.epoch += 1
        start = self.position + self.rank * self.B * self.T
        window = torch.from_numpy(self.tokens[start: start + self.B * self.T + 1].astype(np.int64))
        self.position += self.step_tokens
        if self._pin:
            window = window.pin_memory()
        window = window.to(self.device, non_blocking=self._pin)
        inputs = window[:-1].view(self.B, self.T)
        targets = window[1:].view(self.B, self.T)
        return inputs, targets

    def state_dict(self) -> dict:
        # num_tokens guards against resuming on a different stream, where the
        # position would silently point somewhere else
        return {"position": self.position, "epoch": self.epoch, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_tokens"] != len(self.tokens):
            raise ValueError(
                f"loader state is for a stream of {state['num_tokens']} tokens, but this stream has "
                f"{len(self.tokens)}; was the corpus, max_bytes, split or tokenizer changed?"
            )
        # position is a global stream offset, so it stays valid even if world_size,
        # batch_size or seq_len changed between the runs
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])


# -----------------------------------------------------------------------------
# bits per byte

def token_bytes(tokenizer, device: str | torch.device = "cpu") -> torch.Tensor:
    """(vocab_size,) int64: UTF-8 bytes each token id stands for; 0 for specials."""
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=device)


def bpb_sums(losses: torch.Tensor, targets: torch.Tensor,
             token_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of nats and sum of bytes over the targets, special tokens excluded.

    losses are per-token cross-entropies in nats (reduction="none"), same shape
    as targets. Targets that are special tokens (0 bytes) or ignored (< 0, e.g.
    ignore_index -1) contribute neither nats nor bytes. Returned as float64 /
    int64 scalars on the losses' device, so several batches can be added up and
    all_reduce'd across ranks before calling bits_per_byte.
    """
    if losses.shape != targets.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and targets {tuple(targets.shape)} must have the same shape")
    valid = targets >= 0
    nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)
    nats = torch.where(nbytes > 0, losses.double(), 0.0).sum()
    return nats, nbytes.sum()


def bits_per_byte(total_nats, total_bytes) -> float:
    """nanochat's metric: sum of nats / (ln 2 * sum of bytes).

    Unlike per-token loss, this does not depend on the tokenizer: a model that
    spends fewer tokens per byte is not rewarded for it.
    """
    total_nats, total_bytes = float(total_nats), float(total_bytes)
    if total_bytes <= 0:
        raise ValueError("bits_per_byte needs at least one non-special target token (total bytes is 0)")
    return total_nats / (math.log(2) * total_bytes)
