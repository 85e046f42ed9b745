"""A checkpoint round trip restores every piece of run state, each checked directly: the model's
parameters, every optimizer state tensor and counter, the step, the data position, extra meta, and
every RNG stream (python, numpy, torch CPU, and CUDA where there is one) — not only through losses,
which today draw no random numbers and so would not notice a stream that is not restored."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from torch_impl.data.tokenizer import ByteTokenizer
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import hybrid
from torch_impl.training.checkpoint import load_training_state, save_checkpoint, verify_checkpoint

CONFIG = GPTConfig(sequence_len=16, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def build(seed: int, device: str) -> tuple[GPT, object]:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device=device)
    model.init_weights()
    opt = hybrid(model.named_parameters(), model_dim=CONFIG.n_embd, ns_dtype=torch.float32, normuon_beta2=0.95)
    return model, opt


def train_steps(model: GPT, opt, steps: int, device: str) -> None:
    for _ in range(steps):
        x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.sequence_len), device=device)
        model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def state_tensors(opt) -> dict[str, torch.Tensor | float | int]:
    """Every state entry of every parameter, flattened to name -> value."""
    flat = {}
    for kind, part in opt.state_dict().items():
        for pid, entries in part["state"].items():
            for key, value in entries.items():
                flat[f"{kind}/{pid}/{key}"] = value.clone() if torch.is_tensor(value) else value
    return flat


def rng_streams(device: str) -> dict:
    streams = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device == "cuda":
        streams["cuda"] = torch.cuda.get_rng_state()
    return streams


def same_streams(a: dict, b: dict) -> bool:
    return (a.keys() == b.keys() and a["python"] == b["python"] and torch.equal(a["torch"], b["torch"])
            and a["numpy"][0] == b["numpy"][0] and np.array_equal(a["numpy"][1], b["numpy"][1])
            and a["numpy"][2:] == b["numpy"][2:]
            and ("cuda" not in a or torch.equal(a["cuda"], b["cuda"])))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_round_trip_restores_every_piece_of_run_state(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, opt = build(seed=1, device=device)
    train_steps(model, opt, 3, device)  # momentum, NorMuon and Adam moments all non-zero
    # every stream advanced to a state no seed call produces
    random.seed(11), random.gauss(0, 1)  # leaves a cached second gaussian in the state
    np.random.seed(12), np.random.standard_normal(5)  # also leaves a cached gaussian
    torch.manual_seed(13), torch.rand(7)
    if device == "cuda":
        torch.cuda.manual_seed(14), torch.rand(7, device=device)
    saved_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved_state = state_tensors(opt)
    saved_streams = rng_streams(device)
    loader = {"position": 12345, "epoch": 2, "num_tokens": 99999}
    ckpt = save_checkpoint(tmp_path, 3, model, opt, ByteTokenizer(), loader, {"data": {"train_sha256": "ab"}})
    verify_checkpoint(ckpt)

    # everything different: other weights, fresh optimizer, other RNG states
    other, other_opt = build(seed=2, device=device)
    random.seed(21), np.random.seed(22), torch.manual_seed(23)
    if device == "cuda":
        torch.cuda.manual_seed(24)
    assert not torch.equal(other.lm_head.weight, saved_params["lm_head.weight"]) and not state_tensors(other_opt)
    assert not same_streams(rng_streams(device), saved_streams)

    meta = load_training_state(ckpt, other, other_opt)

    assert meta["step"] == 3 and meta["loader"] == loader and meta["data"] == {"train_sha256": "ab"}
    for name, p in other.named_parameters():
        assert torch.equal(p, saved_params[name]), name  # bitwise
    restored = state_tensors(other_opt)
    assert restored.keys() == saved_state.keys() and len(restored) > 10
    for key, value in saved_state.items():
        if torch.is_tensor(value):
            assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
        else:
            assert restored[key] == value, key
    assert same_streams(rng_streams(device), saved_streams)
    # and the restored streams draw what the saved ones would have
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == \
        (random.setstate(saved_streams["python"]) or random.random(),
         np.random.set_state(saved_streams["numpy"]) or np.random.standard_normal(),
         torch.set_rng_state(saved_streams["torch"]) or torch.rand(1).item())
