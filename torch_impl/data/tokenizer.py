"""
Tokenizers: text <-> token ids.

Two kinds with one interface (encode / encode_np / encode_batch / decode,
vocab_size, bos_id, token_byte_lengths):

- ByteTokenizer: the 256 UTF-8 byte values plus one special <|bos|> (id 256).
  No training, no dependencies, and always available, so it is the default.
- BPETokenizer: byte-level BPE trained with the HuggingFace `tokenizers`
  library (optional dependency), with the GPT-4 style pre-split that nanochat
  uses. Being byte-level, every string round-trips exactly.

The only special token is <|bos|>, which the data pipeline puts in front of
every document. decode() skips it. Text that happens to contain the literal
string "<|bos|>" is encoded as ordinary text, never as the special id, so a
corpus cannot inject document boundaries.

save_tokenizer / load_tokenizer record which tokenizer a checkpoint was trained
with, in a small JSON file inside the checkpoint directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

BOS = "<|bos|>"

# GPT-4's pre-tokenization split, as modified by nanochat (numbers split into
# groups of at most 2 digits rather than 3, which suits small vocabularies).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: token streams are big, so halve them when we can."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# -----------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus <|bos|> = 256."""

    kind = "byte"
    vocab_size = 257
    bos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        # frombuffer views the bytes without a Python-level loop; astype widens to uint16
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} out of range for ByteTokenizer (vocab_size {self.vocab_size})")
        # dropping the special ids leaves the raw bytes; a cut multi-byte char becomes U+FFFD
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> list[int]:
        return [1] * 256 + [0]

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


# -----------------------------------------------------------------------------

def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "BPETokenizer needs the HuggingFace `tokenizers` package (pip install tokenizers)"
        ) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (HF `tokenizers`); build with BPETokenizer.train(...) or .load(path)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        bos_id = hf_tokenizer.token_to_id(BOS)
        if bos_id is None:
            raise ValueError(f"tokenizer has no {BOS} token; was it trained by BPETokenizer.train?")
        # treat a literal "<|bos|>" inside the text as text, never as the special id
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.bos_id = bos_id
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on the documents. The result may have fewer than vocab_size tokens
        if the corpus runs out of pairs to merge; check .vocab_size."""
        tk = _require_tokenizers()
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 byte tokens + {BOS}), got {vocab_size}")
        # same recipe as nanochat's HuggingFaceTokenizer: no normalizer, GPT-4 regex
        # split, then the byte-level mapping without its own regex
        tok = tk.Tokenizer(tk.models.BPE())
        tok.normalizer = None
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(pattern=tk.Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=0,
            show_progress=False,
            # all 256 byte symbols up front, so no input can ever be out of vocabulary
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[BOS],
        )
        tok.train_from_iterator(docs, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=token_dtype(self.vocab_size))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # the Rust side parallelizes over documents; the _fast variant skips offset tracking
        enc = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for BPETokenizer (vocab_size {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_byte_lengths(self) -> list[int]:
        # in byte-level BPE each character of a token's string stands for exactly
        # one byte, so the string length is the byte length; specials count 0
        special = set(self._tok.get_added_tokens_decoder())
        return [0 if i in special else len(self._tok.id_to_token(i)) for i in range(self.vocab_size)]

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        tk = _require_tokenizers()
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        return cls(tk.Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | BPETokenizer


# -----------------------------------------------------------------------------
# which tokenizer a checkpoint used

def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> None:
    """Write tokenizer_meta.json (kind, vocab_size, bos_id) and, for BPE, tokenizer.json.
    The byte tokenizer has no state, so its kind name is all that is stored."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id}
    if isinstance(tok, BPETokenizer):
        tok.save(d / BPE_FILE)
        meta["file"] = BPE_FILE
    (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no tokenizer metadata (was the checkpoint saved with save_tokenizer?)")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer.load(d / meta.get("file", BPE_FILE))
    else:
        raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r} (expected 'byte' or 'bpe')")
    # a mismatch here means the files were edited or mixed between checkpoints;
    # the model's embedding table would silently disagree with the ids
    if tok.vocab_size != meta.get("vocab_size") or tok.bos_id != meta.get("bos_id"):
        raise ValueError(
            f"{meta_path}: says vocab_size={meta.get('vocab_size')}, bos_id={meta.get('bos_id')} "
            f"but the loaded tokenizer has vocab_size={tok.vocab_size}, bos_id={tok.bos_id}"
        )
    return tok
