"""Text from a model: the sample printed at the end of a training run, and `python -m
torch_impl.sample`'s (tools/sample.py). Tokens are decoded as they come, emitting only finished
characters."""

from __future__ import annotations

from torch_impl.training.device import autocast


class StreamDecoder:
    """Decode a growing list of ids to text, emitting only what is final: a byte-level token may be
    half of a UTF-8 character, which would decode to U+FFFD until its other half arrives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def generate_text(model, tokenizer, prompt: str, max_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int | None = 0, stream=None) -> str:
    """The generated continuation (without the prompt); with `stream`, also written there as it comes."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    decoder = StreamDecoder(tokenizer)
    with autocast(model.get_device()):
        for token in model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, seed=seed):
            piece = decoder.push(token)
            if stream is not None and piece:
                stream.write(piece)
                stream.flush()
    tail = decoder.flush()
    if stream is not None and tail:
        stream.write(tail)
    return tokenizer.decode(decoder.ids)
