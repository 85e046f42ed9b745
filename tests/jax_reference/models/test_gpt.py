"""Tests for jax_reference/models/gpt.py against an independent float64 NumPy transcription of the spec.

The NumPy model below is written from .specs/gpt_math.md alone, deliberately in a different style
(per-batch, per-head and per-query loops, an explicit max-subtracted softmax) so that a bug shared by
both implementations would have to be a misreading of the spec rather than a shared shortcut.

Every new (config, B, T) compiles a new XLA program (~0.5 s on CPU), so the property tests draw from
a few fixed configs with B = 2 and two sequence lengths each; hypothesis varies the data.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_reference.models.gpt import (
    GPTConfig,
    forward,
    forward_jit,
    init_params,
    load_safetensors,
    loss,
    loss_jit,
    param_shapes,
)

FAST = settings(deadline=None, max_examples=20)

CONFIGS = [
    # GQA, 2 query heads per kv head, head_dim 4
    GPTConfig(sequence_len=8, vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=16),
    # MQA (n_kv_head == 1), head_dim 8
    GPTConfig(sequence_len=8, vocab_size=13, n_layer=2, n_head=4, n_kv_head=1, n_embd=32),
    # plain MHA (n_kv_head == n_head), smallest legal head_dim 2
    GPTConfig(sequence_len=6, vocab_size=7, n_layer=1, n_head=4, n_kv_head=4, n_embd=8),
    # GQA with 3 kv heads and 3 layers
    GPTConfig(sequence_len=10, vocab_size=17, n_layer=3, n_head=6, n_kv_head=3, n_embd=24),
]
B = 2


def seq_lens(cfg):
    return [cfg.sequence_len, cfg.sequence_len // 2 + 1]


config_and_T = st.sampled_from([(c, T) for c in CONFIGS for T in seq_lens(c)])
seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------
# independent float64 NumPy model, written from the spec


def spec_shapes(cfg):
    C, D = cfg.n_embd, cfg.n_embd // cfg.n_head
    out = {"transformer.wte.weight": (cfg.vocab_size, C)}
    for i in range(cfg.n_layer):
        out[f"transformer.h.{i}.attn.c_q.weight"] = (cfg.n_head * D, C)
        out[f"transformer.h.{i}.attn.c_k.weight"] = (cfg.n_kv_head * D, C)
        out[f"transformer.h.{i}.attn.c_v.weight"] = (cfg.n_kv_head * D, C)
        out[f"transformer.h.{i}.attn.c_proj.weight"] = (C, C)
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = (4 * C, C)
        out[f"transformer.h.{i}.mlp.c_proj.weight"] = (C, 4 * C)
    out["lm_head.weight"] = (cfg.vocab_size, C)
    return out


def random_params(cfg, rng, lm_head_scale=1.0, dtype=np.float32):
    """N(0, 1) embeddings, N(0, 1/fan_in) Linear weights; lm_head_scale > 1 drives the softcap."""
    params = {}
    for name, shape in spec_shapes(cfg).items():
        std = 1.0 if name == "transformer.wte.weight" else 1.0 / math.sqrt(shape[1])
        if name == "lm_head.weight":
            std *= lm_head_scale
        params[name] = rng.normal(0.0, std, shape).astype(dtype)
    return params


def np_forward(params, idx, cfg):
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    H, Hkv = cfg.n_head, cfg.n_kv_head
    D = cfg.n_embd // H
    eps = 1.1920929e-07
    Bn, T = idx.shape

    def norm(x):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    j = np.arange(D // 2)
    inv_freq = 1.0 / 10000.0 ** (2 * j / D)
    angle = np.arange(T)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle), np.sin(angle)

    def rotary(x):  # x: (T, D) for one head
        x1, x2 = x[:, : D // 2], x[:, D // 2 :]
        return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=1)

    x = norm(p["transformer.wte.weight"][idx])
    for i in range(cfg.n_layer):
        a = f"transformer.h.{i}.attn"
        h = norm(x)
        q = (h @ p[f"{a}.c_q.weight"].T).reshape(Bn, T, H, D)
        k = (h @ p[f"{a}.c_k.weight"].T).reshape(Bn, T, Hkv, D)
        v = (h @ p[f"{a}.c_v.weight"].T).reshape(Bn, T, Hkv, D)
        y = np.zeros((Bn, T, H, D))
        for b in range(Bn):
            for hq in range(H):
                hk = hq // (H // Hkv)
                qh = norm(rotary(q[b, :, hq]))
                kh = norm(rotary(k[b, :, hk]))
                vh = v[b, :, hk]
                for t in range(T):
                    s = kh[: t + 1] @ qh[t] / math.sqrt(D)
                    e = np.exp(s - s.max())
                    y[b, t, hq] = (e / e.sum()) @ vh[: t + 1]
        x = x + y.reshape(Bn, T, H * D) @ p[f"{a}.c_proj.weight"].T
        m = f"transformer.h.{i}.mlp"
        h = norm(x)
        x = x + np.maximum(h @ p[f"{m}.c_fc.weight"].T, 0.0) ** 2 @ p[f"{m}.c_proj.weight"].T
    logits = norm(x) @ p["lm_head.weight"].T
    return 15.0 * np.tanh(logits / 15.0)


def np_cross_entropy(logits, targets):
    logits = np.asarray(logits, dtype=np.float64)
    keep = targets != -1
    if not keep.any():
        return 0.0
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return float(np.mean((lse - picked)[keep]))


# ---------------------------------------------------------------------------------------------
# (a) forward vs the float64 NumPy model


# Tolerance: float32 has unit roundoff u = 2**-24 ~ 6e-8. Each stage (dot products of length
# K <= 4 * n_embd = 128, rsqrt, exp, tanh) adds O(sqrt(K) u) ~ 1e-6 relative error; the RMSNorms keep
# activations O(1), so over <= 3 layers errors add rather than compound, QK-norm bounds scores by
# sqrt(D) so the softmax is well conditioned, and float32 rotary angles are off by <= T u ~ 6e-7.
# The final hidden state is thus good to ~1e-6 relative, and a logit's absolute error scales with its
# pre-softcap size: ~1e-6 for the O(1) logits of lm_head_scale=1, a few 1e-5 at worst for the ~+-30
# pre-cap logits of lm_head_scale=8 (tanh' <= 1 only helps). Measured over 320 draws: <= 2.1e-6 and
# <= 1.3e-5 respectively. 1e-4 leaves ~8x margin; real math errors (wrong rotary half or sign, wrong
# GQA head, a causal leak, a missing norm) move logits by 1e-2 or more. The QK-norm/rotary order
# cannot be caught by any tolerance: the rotation is orthogonal, so both orders agree in exact
# arithmetic and the spec's "after rotary" only fixes the rounding.
FORWARD_ATOL = 1e-4


@FAST
@given(case=config_and_T, seed=seeds, lm_head_scale=st.sampled_from([1.0, 8.0]))
def test_forward_matches_numpy_float64(case, seed, lm_head_scale):
    cfg, T = case
    rng = np.random.default_rng(seed)
    params = random_params(cfg, rng, lm_head_scale)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    got = forward_jit(params, idx, cfg)
    assert got.dtype == jnp.float32 and got.shape == (B, T, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(got), np_forward(params, idx, cfg), rtol=0, atol=FORWARD_ATOL)


def test_forward_single_token_and_eager_matches_jit():
    # T = 1 (attention over a single key) through the un-jitted path, which also runs the
    # concrete-value checks. Eager and jit may fuse differently, hence allclose.
    cfg = CONFIGS[2]
    rng = np.random.default_rng(0)
    params = random_params(cfg, rng)
    idx = rng.integers(0, cfg.vocab_size, (1, 1))
    eager = np.asarray(forward(params, idx, cfg))
    np.testing.assert_allclose(eager, np_forward(params, idx, cfg), rtol=0, atol=FORWARD_ATOL)
    # eager and jit run the same XLA ops; fusion may reorder fp32 sums: ~10 ULP of logits ≤ 15
    np.testing.assert_allclose(eager, np.asarray(forward_jit(params, idx, cfg)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) causality


@FAST
@given(cfg=st.sampled_from(CONFIGS), seed=seeds, data=st.data())
def test_causal(cfg, seed, data):
    T = cfg.sequence_len
    t = data.draw(st.integers(0, T - 1), label="t")
    rng = np.random.default_rng(seed)
    params = random_params(cfg, rng)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    idx2 = idx.copy()
    idx2[:, t] = (idx[:, t] + rng.integers(1, cfg.vocab_size)) % cfg.vocab_size
    a = np.asarray(forward_jit(params, idx, cfg))
    b = np.asarray(forward_jit(params, idx2, cfg))
    # Exact equality: masked scores are -inf, so future keys get probability exactly 0 and contribute
    # exactly 0 * v = 0; every other operation on positions < t sees identical inputs and the same
    # compiled program. Any leak at all is a bug.
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    # and the test is not vacuous: position t itself sees the new token
    assert np.all(np.abs(a[:, t] - b[:, t]).max(-1) > 0)


# ---------------------------------------------------------------------------------------------
# (c) loss


@FAST
@given(cfg=st.sampled_from(CONFIGS), seed=seeds, ignore_frac=st.sampled_from([0.0, 0.4, 1.0]))
def test_loss_matches_cross_entropy_of_logits(cfg, seed, ignore_frac):
    T = cfg.sequence_len  # one compiled loss per config; shorter T is covered by the forward test
    rng = np.random.default_rng(seed)
    params = random_params(cfg, rng, lm_head_scale=4.0)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[rng.random((B, T)) < ignore_frac] = -1
    got = loss_jit(params, idx, targets, cfg)
    want = np_cross_entropy(forward_jit(params, idx, cfg), targets)
    assert got.shape == () and got.dtype == jnp.float32
    # Same float32 logits on both sides; only the float32 log-softmax and mean differ from the float64
    # recomputation: |logits| <= 15 and V <= 17 give absolute errors of a few u * 15 ~ 1e-6.
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=2e-6)


def test_loss_ignores_masked_positions_exactly():
    # changing the target at an ignored position must not change the loss at all
    cfg = CONFIGS[1]
    rng = np.random.default_rng(2)
    params = random_params(cfg, rng)
    idx = rng.integers(0, cfg.vocab_size, (B, cfg.sequence_len))
    targets = rng.integers(0, cfg.vocab_size, idx.shape)
    masked = targets.copy()
    masked[0, 3] = -1
    only_kept = np.delete(np.asarray(forward_jit(params, idx, cfg)).reshape(-1, cfg.vocab_size), 3, 0)
    want = np_cross_entropy(only_kept, np.delete(targets.reshape(-1), 3))
    # fp32 mean of ~30 CE terms vs a float64 numpy CE: ≤ 30·u relative; measured worst 1.25e-6 abs
    np.testing.assert_allclose(float(loss_jit(params, idx, masked, cfg)), want, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# (d) gradients vs central finite differences in float64

GRAD_CFG = GPTConfig(sequence_len=6, vocab_size=7, n_layer=2, n_head=4, n_kv_head=2, n_embd=8)
_value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnames="config")


@settings(deadline=None, max_examples=5)
@given(seed=seeds)
def test_grad_matches_finite_differences(seed):
    cfg = GRAD_CFG
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in random_params(cfg, rng, 2.0, np.float64).items()}
        idx = rng.integers(0, cfg.vocab_size, (B, cfg.sequence_len))
        targets = rng.integers(0, cfg.vocab_size, idx.shape)
        targets[rng.random(idx.shape) < 0.3] = -1
        targets[0, 0] = 0  # at least one kept position
        value, grads = _value_and_grad(params, idx, targets, config=cfg)
        assert value.dtype == jnp.float64
        # One random unit direction per parameter tensor (all its entries at once), so every weight
        # gets a gradient check. Central differences with h = 1e-5 in float64: truncation
        # ~h^2 |L'''| ~ 1e-10, rounding ~1e-16 |L| / h ~ 1e-11; measured |fd - ad| <= 4e-10 over 20
        # seeds. ReLU^2 is only C^1, so a pre-activation within ~h of its kink could add O(h) error,
        # which is rare and small at this h. tol = 1e-7 + 1e-6 |ad| keeps a >= 200x margin and is
        # still far below the O(1) relative error of any real gradient bug.
        h = 1e-5
        for name, g in grads.items():
            d = rng.normal(size=g.shape)
            d /= np.linalg.norm(d)
            plus = dict(params, **{name: params[name] + h * d})
            minus = dict(params, **{name: params[name] - h * d})
            fd = (float(loss_jit(plus, idx, targets, cfg)) - float(loss_jit(minus, idx, targets, cfg))) / (2 * h)
            ad = float(jnp.vdot(g, d))
            assert abs(fd - ad) <= 1e-7 + 1e-6 * abs(ad), (name, fd, ad)


def test_loss_all_ignored_is_zero_with_zero_grad():
    # GRAD_CFG in float64 shares the compiled gradient with the test above
    cfg = GRAD_CFG
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in random_params(cfg, rng, 1.0, np.float64).items()}
        idx = rng.integers(0, cfg.vocab_size, (B, cfg.sequence_len))
        value, grads = _value_and_grad(params, idx, np.full_like(idx, -1), config=cfg)
    assert float(value) == 0.0
    assert all(not np.any(np.asarray(g)) for g in grads.values())


# ---------------------------------------------------------------------------------------------
# parameters, init, loading


@pytest.mark.parametrize("cfg", CONFIGS)
def test_param_shapes_match_spec(cfg):
    got = param_shapes(cfg)
    assert list(got.items()) == list(spec_shapes(cfg).items())  # names, shapes and order


def test_init_params():
    cfg = GPTConfig(sequence_len=8, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    key = jax.random.key(0)
    params = init_params(cfg, key)
    assert {k: v.shape for k, v in params.items()} == param_shapes(cfg)
    assert all(v.dtype == jnp.float32 for v in params.values())
    for name, (fan_out, fan_in) in param_shapes(cfg).items():
        want = 1.0 if "wte" in name else fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in))
        # >= 2048 samples: the sample std is within ~1.6% (1 sigma) of the true one
        np.testing.assert_allclose(np.std(np.asarray(params[name])), want, rtol=0.08, err_msg=name)
    again = init_params(cfg, key)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    other = init_params(cfg, jax.random.key(1))
    assert not np.array_equal(params["lm_head.weight"], other["lm_head.weight"])
    bf16 = init_params(cfg, key, jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in bf16.values())
    np.testing.assert_array_equal(
        np.asarray(bf16["lm_head.weight"]), np.asarray(params["lm_head.weight"]).astype(ml_dtypes.bfloat16)
    )

    zero = init_params(cfg, key, zero_init_outputs=True)
    for name, v in zero.items():
        is_output = name == "lm_head.weight" or name.endswith("c_proj.weight")
        assert (not np.any(np.asarray(v))) == is_output, name
        if not is_output:
            np.testing.assert_array_equal(v, params[name])


def test_init_params_bad_dtype():
    with pytest.raises(ValueError, match="floating"):
        init_params(CONFIGS[0], jax.random.key(0), jnp.int32)
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="x64"):
            init_params(CONFIGS[0], jax.random.key(0), jnp.float64)
    with jax.enable_x64(True):
        assert init_params(CONFIGS[0], jax.random.key(0), jnp.float64)["lm_head.weight"].dtype == jnp.float64


def test_load_safetensors_float32_and_bfloat16(tmp_path):
    cfg = CONFIGS[0]
    rng = np.random.default_rng(3)
    params = random_params(cfg, rng)
    idx = rng.integers(0, cfg.vocab_size, (B, cfg.sequence_len))

    safetensors.numpy.save_file(params, tmp_path / "fp32.safetensors")
    loaded = load_safetensors(tmp_path / "fp32.safetensors")
    assert set(loaded) == set(params)
    for k in params:
        assert loaded[k].dtype == jnp.float32
        np.testing.assert_array_equal(loaded[k], params[k])

    as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    safetensors.numpy.save_file(as_bf16, tmp_path / "bf16.safetensors")
    loaded = load_safetensors(tmp_path / "bf16.safetensors")
    for k in params:
        assert loaded[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(loaded[k]).astype(np.float32), as_bf16[k].astype(np.float32))
    # bfloat16 weights are upcast exactly, so the model is the float32 model of the rounded weights
    upcast = {k: v.astype(np.float32) for k, v in as_bf16.items()}
    np.testing.assert_array_equal(forward_jit(loaded, idx, cfg), forward_jit(upcast, idx, cfg))


# ---------------------------------------------------------------------------------------------
# (e) validation


def test_config_is_hashable_and_normalised():
    a = GPTConfig(8, 11, 2, 4, 2, 16)
    b = GPTConfig(np.int64(8), 11, 2, 4, 2, 16)
    assert a == b and hash(a) == hash(b) and type(b.sequence_len) is int
    assert a.head_dim == 4


FIELDS = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"]
GOOD = dict(sequence_len=8, vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=16)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad", [0, -4, 4.0, True, "4", None])
def test_config_rejects_non_positive_ints(field, bad):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**dict(GOOD, **{field: bad}))


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_embd=18), "n_embd"),  # 18 % 4 != 0
        (dict(n_kv_head=3), "n_kv_head"),  # 4 % 3 != 0
        (dict(n_kv_head=8), "n_kv_head"),  # more kv heads than query heads
        (dict(n_embd=12), "head_dim"),  # head_dim 3 is odd
    ],
)
def test_config_rejects_inconsistent_heads(changes, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**dict(GOOD, **changes))


@pytest.fixture(scope="module")
def small():
    cfg = CONFIGS[0]
    rng = np.random.default_rng(4)
    return cfg, random_params(cfg, rng), rng.integers(0, cfg.vocab_size, (B, cfg.sequence_len))


@pytest.mark.parametrize(
    "make_idx, match",
    [
        (lambda idx, V: idx.astype(np.float32), "integer"),
        (lambda idx, V: idx.astype(bool), "integer"),
        (lambda idx, V: idx[0], r"\(B, T\)"),
        (lambda idx, V: np.where(idx == idx[0, 0], -1, idx), r"\[0, vocab_size"),
        (lambda idx, V: np.where(idx == idx[0, 0], V, idx), r"\[0, vocab_size"),
        (lambda idx, V: np.concatenate([idx, idx], 1), "sequence_len"),
        (lambda idx, V: jnp.asarray(np.where(idx == idx[0, 0], V, idx)), r"\[0, vocab_size"),
    ],
)
def test_bad_idx(small, make_idx, match):
    cfg, params, idx = small
    with pytest.raises(ValueError, match=match):
        forward(params, make_idx(idx, cfg.vocab_size), cfg)
    with pytest.raises(ValueError, match=match):
        loss(params, make_idx(idx, cfg.vocab_size), np.zeros((B, cfg.sequence_len), np.int32), cfg)


@pytest.mark.parametrize(
    "make_targets, match",
    [
        (lambda t, V: t.astype(np.float32), "integer"),
        (lambda t, V: t[:, :-1], "shape"),
        (lambda t, V: np.where(t == t[0, 0], -2, t), "-1"),
        (lambda t, V: np.where(t == t[0, 0], V, t), "vocab_size"),
    ],
)
def test_bad_targets(small, make_targets, match):
    cfg, params, idx = small
    with pytest.raises(ValueError, match=match):
        loss(params, idx, make_targets(idx.copy(), cfg.vocab_size), cfg)


def test_bad_params(small):
    cfg, params, idx = small
    name = "transformer.h.1.attn.c_k.weight"
    missing = {k: v for k, v in params.items() if k != name}
    with pytest.raises(ValueError, match=name):
        forward(missing, idx, cfg)
    with pytest.raises(ValueError, match="extra.weight"):
        forward(dict(params, **{"extra.weight": params[name]}), idx, cfg)
    with pytest.raises(ValueError, match=name):
        forward(dict(params, **{name: params[name].T}), idx, cfg)
    with pytest.raises(ValueError, match=name):
        forward(dict(params, **{name: params[name].astype(np.int32)}), idx, cfg)
    # static checks also run under jit
    with pytest.raises(ValueError, match=name):
        forward_jit(missing, idx, cfg)


def test_traced_out_of_range_values_give_nan(small):
    # Under jit token values are not concrete and cannot raise; they must not be clamped silently.
    cfg, params, idx = small
    bad = idx.copy()
    bad[1, 2] = cfg.vocab_size
    logits = np.asarray(forward_jit(params, bad, cfg))
    # the NaN embedding reaches every position of its sequence (0 * NaN in attention), no other
    assert np.isnan(logits[1]).all() and not np.isnan(logits[0]).any()
    bad[1, 2] = -1  # negative ids would otherwise wrap around to the last row
    assert np.isnan(np.asarray(forward_jit(params, bad, cfg))[1]).all()
    targets = idx.copy()
    targets[0, 0] = cfg.vocab_size
    assert np.isnan(float(loss_jit(params, idx, targets, cfg)))
