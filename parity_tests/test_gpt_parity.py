"""torch_impl.models.gpt vs jax_reference.models.gpt: logits, loss and every parameter gradient in fp32,
and a short hybrid-optimizer training run in both frameworks from the same init and batches.

Tolerances. Each framework was measured against its own float64 re-derivation of the spec
(tests/*/test_gpt.py): worst 1.1e-5 (torch) and 1.3e-5 (JAX) absolute on logits pushed into
the softcap, with allowed 1e-4 / 2e-4 there. torch vs JAX is then within the sum, 3e-4.
Gradients go through the same ops backwards: the measured worst per-parameter relative
Frobenius difference is 3e-6 (see the note at GRAD_RTOL); a wrong rotary sign, GQA mapping or
softcap moves them by O(1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_reference.models.gpt as JG
import jax_reference.optim.hybrid as JO
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import hybrid
from torch_impl.optim.hybrid import label_param

LOGIT_ATOL = 3e-4
# 30× the measured worst (3e-6 over the CI examples): fp32 backward through ≤ 3 layers.
GRAD_RTOL = 1e-4

# One compile per (config, batch shape): configs are hashable and static.
loss_and_grad = jax.jit(jax.value_and_grad(JG.loss), static_argnames="config")

CONFIGS = [  # (n_layer, n_head, n_kv_head, n_embd): MHA, GQA 2:1, MQA
    (2, 4, 4, 32), (2, 4, 2, 32), (3, 4, 1, 32), (1, 2, 1, 16),
]


def configs(cfg, vocab=61, seq=16):
    n_layer, n_head, n_kv, n_embd = cfg
    kw = dict(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
              n_kv_head=n_kv, n_embd=n_embd)
    return GPTConfig(**kw), JG.GPTConfig(**kw)


def random_weights(tconfig, seed):
    """Non-zero everywhere (nanochat zero-inits lm_head and c_proj, which would make most
    gradients trivially zero); lm_head large enough to reach the softcap's curved part."""
    rng = np.random.default_rng(seed)
    model = GPT(tconfig)
    weights = {}
    for name, p in model.state_dict().items():
        scale = 1.0 if "wte" in name else (3.0 if "lm_head" in name else 1 / np.sqrt(p.shape[1]))
        weights[name] = (rng.standard_normal(tuple(p.shape)) * scale).astype(np.float32)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    return model, weights


def batch(seed, B, T, vocab, ignore=True):
    rng = np.random.default_rng(seed + 7)
    idx = rng.integers(0, vocab, (B, T))
    targets = rng.integers(0, vocab, (B, T))
    if ignore:
        targets[rng.random((B, T)) < 0.2] = -1
        targets[0, 0] = 3  # never all ignored
    return idx, targets


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@given(cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 2**31 - 1),
       B=st.sampled_from((2,)), T=st.sampled_from((16,)))  # one compile per config
def test_logits_loss_and_all_gradients_match(cfg, seed, B, T):
    tconfig, jconfig = configs(cfg)
    model, weights = random_weights(tconfig, seed)
    idx, targets = batch(seed, B, T, tconfig.vocab_size)
    t_logits = model(torch.from_numpy(idx)).detach().numpy()
    jparams = {k: jnp.asarray(v) for k, v in weights.items()}
    j_logits = np.asarray(JG.forward(jparams, jnp.asarray(idx), jconfig))
    np.testing.assert_allclose(t_logits, j_logits, rtol=0, atol=LOGIT_ATOL)
    assert np.abs(t_logits).max() > 5  # the softcap's non-linear part is exercised

    loss = model(torch.from_numpy(idx), torch.from_numpy(targets))
    loss.backward()
    loss = loss.detach()
    j_loss, j_grads = loss_and_grad(jparams, jnp.asarray(idx), jnp.asarray(targets), config=jconfig)
    np.testing.assert_allclose(float(loss), float(j_loss), rtol=1e-5)  # fp32 CE mean; logits ≤ 3e-4 apart
    names = dict(model.named_parameters())
    assert set(names) == set(j_grads)
    for name, p in names.items():
        assert rel(p.grad.numpy(), np.asarray(j_grads[name])) <= GRAD_RTOL, name


@settings(max_examples=4)  # each example is 3 steps in two frameworks; shapes never change
@given(seed=st.integers(0, 2**31 - 1))
def test_short_training_run_gives_the_same_losses_and_weights(seed):
    """3 hybrid-optimizer steps (Muon in fp32 NS + AdamW groups) from the same init and batches.
    Per step the weights differ by the NS fp32 tolerance times lr (Muon) and AdamW rounding;
    the loss then differs by ~1e-6 (measured worst 9.4e-7 relative over 20 seeds × 3 steps).

    AdamW eps is 1e-3 here, not nanochat's 1e-10: at step 1 AdamW moves each entry by
    ≈ lr·sign(g), so an embedding-gradient entry at rounding-noise level (|g| ~ 1e-8, sign
    decided by summation order) flips a whole ±lr step (seen: 1.34 at lr ≈ 1). An update's
    sensitivity to gradient noise δ is ≤ lr·δ/eps; eps = 1e-3 bounds it at ~1e-5·lr, so the
    test compares the pipelines instead of AdamW's amplification of rounding noise."""
    tconfig, jconfig = configs((2, 4, 2, 32))
    model, weights = random_weights(tconfig, seed)
    lrs = dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5,
               adam_betas=(0.8, 0.95), adam_eps=1e-3, model_dim=tconfig.n_embd)
    topt = hybrid(model.named_parameters(), ns_dtype=torch.float32, **lrs)
    jparams = {k: jnp.asarray(v) for k, v in weights.items()}
    tx = JO.hybrid(jparams, ns_dtype=jnp.float32, **lrs)
    state = tx.init(jparams)
    for step in range(3):
        idx, targets = batch(seed + step, 2, 16, tconfig.vocab_size, ignore=False)
        loss = model(torch.from_numpy(idx), torch.from_numpy(targets))
        model.zero_grad(set_to_none=True)
        loss.backward()
        topt.step()
        j_loss, grads = loss_and_grad(jparams, jnp.asarray(idx), jnp.asarray(targets), config=jconfig)
        updates, state = tx.update(grads, state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        np.testing.assert_allclose(float(loss.detach()), float(j_loss), rtol=1e-5)  # measured ≤ 9.4e-7
        for name, p in model.named_parameters():
            atol = E2E_ATOL[label_param(name, p.shape)]
            np.testing.assert_allclose(p.detach().numpy(), np.asarray(jparams[name]), rtol=0,
                                       atol=atol, err_msg=f"{name} after step {step + 1}")


# Weight tolerance per optimizer group after ≤ 3 steps: measured worst over 20 seeds, ×4–8.
# Muon 1.2e-6 and lm_head 3.3e-6 are fp32 rounding; the embedding's lr/eps = 0.98/1e-3 ≈ 1e3
# multiplies its gradient rounding (~1e-7) into 3.7e-4. A real bug (a wrong lr scale, beta or
# bias correction) moves weights by ~lr ≈ 1e-2–1, far above every entry.
E2E_ATOL = {"muon": 1e-5, "unembedding": 2e-5, "scalar": 2e-5, "embedding": 1.5e-3}
