"""Exported safetensors weights give the same logits in the JAX reference as in torch: a fresh
random model through `export_safetensors`, and a trained checkpoint through the export CLI.

Tolerance: both sides compute in float32 (unit roundoff u = 2^-24 ~ 6e-8). Each stage (dot products of
length K <= 4 * n_embd = 256 here, rsqrt, exp, tanh) contributes O(sqrt(K) u) ~ 1e-6 relative error,
the RMSNorms keep activations O(1) so over 2 layers errors add rather than compound, and QK-norm keeps
the softmax well conditioned. Each framework's logits are then within ~1e-6 relative of the exact ones,
i.e. ~1e-5 absolute for pre-softcap logits of size ~10 (the lm_head below is drawn 4x the init scale to
reach into the softcap's nonlinear range), so torch vs JAX differ by ~2e-5 at most; measured: <= 8.3e-6
over 6 draws. atol 1e-4 leaves >= 5x margin, while an export bug (a transposed matrix, a dropped or
renamed tensor, bf16 rounding ~4e-3 relative) moves logits by 1e-2 or more. The same 1e-4 is
tests/jax_reference/models/test_gpt.py's bound.
"""

import math

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

import jax_reference.models.gpt as J
from tests.train.common import check, run
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.tools.export import export_safetensors, read_config
from torch_impl.training.checkpoint import load_model

ATOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """In-process torch on one thread, as in tests/train/conftest.py: the suite shares two cores
    with subprocess runs, and oversubscribed intra-op threads make torch slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(config, seed=0):
    # the real init zeroes lm_head and every c_proj, which would make the logits identically 0
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 4.0 if name == "lm_head.weight" else 1.0
            p.normal_(0.0, scale / math.sqrt(p.shape[1]))
    return model.eval()


def jax_config(config: GPTConfig) -> J.GPTConfig:
    return J.GPTConfig(sequence_len=config.sequence_len, vocab_size=config.vocab_size, n_layer=config.n_layer,
                       n_head=config.n_head, n_kv_head=config.n_kv_head, n_embd=config.n_embd)


@pytest.mark.parametrize("config", [
    GPTConfig(sequence_len=32, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
    GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),  # GQA
])
def test_exported_weights_give_same_logits_in_jax(tmp_path, config):
    model = random_model(config)
    path = export_safetensors(model, tmp_path / "model.safetensors")

    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        assert set(f.keys()) == set(model.state_dict())
    assert read_config(path) == config

    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.sequence_len))
    with torch.no_grad():
        want = model(torch.from_numpy(idx)).numpy()
    params = J.load_safetensors(path)
    got = np.asarray(J.forward_jit(params, jax.numpy.asarray(idx), jax_config(read_config(path))))
    assert got.dtype == np.float32
    assert np.abs(want).max() > 5.0  # the logits are far from trivial
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_export_cli_matches_jax(trained, tmp_path):
    # trained weights: nonzero lm_head and c_proj (the fresh init has them at zero); tolerance as derived
    # above (test_exported_weights_give_same_logits_in_jax)
    out_dir, _ = trained
    path = tmp_path / "model.safetensors"
    check(run(["-m", "torch_impl.export", "--checkpoint", str(out_dir), "--out", str(path)]))
    model, _, _ = load_model(out_dir)
    idx = np.random.default_rng(0).integers(0, 257, (2, 64))
    with torch.no_grad():
        want = model(torch.from_numpy(idx)).numpy()
    c = read_config(path)
    cfg = J.GPTConfig(sequence_len=c.sequence_len, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                      n_kv_head=c.n_kv_head, n_embd=c.n_embd)
    got = np.asarray(J.forward_jit(J.load_safetensors(path), jax.numpy.asarray(idx), cfg))
    assert np.abs(want).std() > 0.5
    # torch vs JAX fp32 forward of the same weights: each within ~1e-5 of its fp64 spec
    # (test_gpt.py in both trees); measured ≤ 8.3e-6 here
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
