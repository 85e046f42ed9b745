"""
Tests of torch_impl/models/gpt.py against .specs/gpt_math.md. Everything runs in fp32 on CPU with tiny configs.

The reference forward below is written from the spec alone, in float64, with explicit per-head loops and an
explicit softmax, so it shares no code (rms_norm, SDPA, enable_gqa, nn.Linear) with the model under test.
"""

import math

import pytest
import torch

from torch_impl.models.gpt import GPT, GPTConfig, KVCache, norm

FP32_EPS = 1.1920929e-07  # the spec's rms_norm eps, written out rather than taken from torch.finfo
SMALL = dict(sequence_len=16, vocab_size=61, n_layer=2, n_embd=32, n_head=4)


def small_config(**overrides):
    return GPTConfig(**{**SMALL, "n_kv_head": 2, **overrides})


def random_model(config, seed=0):
    """A model whose every weight is random. With the real init, lm_head and the c_proj maps are zero, the
    logits are identically 0 and parity tests would pass vacuously. The lm_head is drawn large enough
    (logit std ~ 8) that many logits sit in the nonlinear part of the 15*tanh(x/15) softcap."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[1]
            std = 8.0 / math.sqrt(fan_in) if name == "lm_head.weight" else 1.0 / math.sqrt(fan_in)
            p.normal_(0.0, std)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# float64 reference written from the spec


def ref_forward(state_dict, config, idx):
    """Logits (B, T, V) in float64, straight from the spec's formulas."""
    W = {k: v.detach().double() for k, v in state_dict.items()}
    B, T = idx.shape
    H, Hkv, C = config.n_head, config.n_kv_head, config.n_embd
    D = C // H
    rep = H // Hkv

    def rms(x):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + FP32_EPS)

    # the spec computes the rotary tables in float32
    j = torch.arange(D // 2, dtype=torch.float32)
    inv_freq = 1.0 / torch.pow(torch.tensor(10000.0), 2.0 * j / D)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(angle).double(), torch.sin(angle).double()  # (T, D/2)

    def rotary(x):  # x: (T, D)
        x1, x2 = x[:, : D // 2], x[:, D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    x = rms(W["transformer.wte.weight"][idx])  # (B, T, C)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        h = rms(x)
        q = (h @ W[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ W[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ W[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        y = torch.zeros(B, T, H, D, dtype=torch.float64)
        for b in range(B):
            for hq in range(H):
                hk = hq // rep  # GQA: query head hq reads kv head hq // (H / Hkv)
                qh = rms(rotary(q[b, :, hq]))
                kh = rms(rotary(k[b, :, hk]))
                for t in range(T):
                    scores = (kh[: t + 1] @ qh[t]) / math.sqrt(D)  # causal: keys 0..t only
                    e = torch.exp(scores - scores.max())
                    y[b, t, hq] = (e / e.sum()) @ v[b, : t + 1, hk]
        x = x + y.reshape(B, T, C) @ W[p + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + torch.clamp(h @ W[p + "mlp.c_fc.weight"].T, min=0.0) ** 2 @ W[p + "mlp.c_proj.weight"].T
    logits = rms(x) @ W["lm_head.weight"].T
    return 15.0 * torch.tanh(logits / 15.0)


# Tolerance for fp32 model vs float64 reference. fp32 unit roundoff is u = 2^-24 ~ 6e-8. Every matmul here
# has inner dimension K <= 4*n_embd = 128 and O(1) operands (each is preceded by an RMSNorm, and the weights
# are ~1/sqrt(fan_in)), so one matmul contributes an error of ~sqrt(K)*u ~ 7e-7 typical and K*u ~ 8e-6 worst
# case relative to its O(1)-to-O(10) outputs; two layers chain ~10 such steps, and the final logits (before
# the softcap, whose slope is <= 1) have std ~8. That gives ~1e-5 typical and ~1e-3 absolute as a fully
# worst-case bound; we use 2e-4 absolute (observed max ~1.1e-5 over
# n_kv_head in {1, 2, 4}, i.e. ~20x margin). This is still far below any real mistake:
# a wrong rotary pairing, GQA head mapping, softcap constant or missing norm moves logits by O(1).
# (The rms_norm eps is below this resolution, so it is tested on its own in test_norm_eps.)
PARITY_ATOL = 2e-4


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_forward_matches_float64_reference(n_kv_head):
    config = small_config(n_kv_head=n_kv_head)
    model = random_model(config, seed=n_kv_head)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)
    ref = ref_forward(model.state_dict(), config, idx)
    assert logits.dtype == torch.float32 and logits.shape == (2, config.sequence_len, config.vocab_size)
    assert ref.abs().max() > 10.0  # the softcap is actually exercised
    torch.testing.assert_close(logits.double(), ref, atol=PARITY_ATOL, rtol=0)


def test_norm_eps():
    # With mean(x^2) ~ 1e-8 the eps term dominates, so only eps = float32 machine epsilon reproduces the
    # spec (1e-6, 1e-5 or the float64 eps would each be off by a large factor).
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 1e-4
    expected = x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + FP32_EPS)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------------------
# state dict layout


def test_state_dict_keys_and_shapes():
    config = GPTConfig(sequence_len=16, vocab_size=61, n_layer=2, n_embd=32, n_head=4, n_kv_head=1)
    # Written from the spec by hand: V=61, C=32, D=8, n_kv_head*D=8, 4*C=128. No biases, no rotary buffers.
    expected = {"transformer.wte.weight": (61, 32)}
    for i in range(2):
        expected.update({
            f"transformer.h.{i}.attn.c_q.weight": (32, 32),
            f"transformer.h.{i}.attn.c_k.weight": (8, 32),
            f"transformer.h.{i}.attn.c_v.weight": (8, 32),
            f"transformer.h.{i}.attn.c_proj.weight": (32, 32),
            f"transformer.h.{i}.mlp.c_fc.weight": (128, 32),
            f"transformer.h.{i}.mlp.c_proj.weight": (32, 128),
        })
    expected["lm_head.weight"] = (61, 32)
    sd = GPT(config).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # a nanochat-style state dict loads strictly into a fresh model
    GPT(config).load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------------------
# causality


def test_causality():
    # Exact equality, not just fp32 closeness: every op is either per-position (embedding, norms, linears)
    # or attention where a later key is masked to -inf, so it contributes exp(-inf) = 0 exactly and cannot
    # move the row max. The kernels' reduction order depends on shapes only, never on values, so the same
    # shapes give bit-identical results for the unchanged prefix.
    config = small_config()
    model = random_model(config)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=g)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, config.sequence_len - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % config.vocab_size
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.allclose(out[:, t], base[:, t])  # the change is visible from position t on


# ----------------------------------------------------------------------------------------------------------
# KV cache and generation

# Cached decoding runs the same math with different shapes (one query at a time, different SDPA paths), so
# results differ from the full forward only by fp32 reassociation: same bound as above, observed max
# ~9e-6. 1e-4 leaves ~10x margin while still catching any rotary-offset or masking error, which is O(1).
CACHE_ATOL = 1e-4


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_kv_cache_logits_match_full_forward(n_kv_head):
    # prefill 5 tokens into an empty cache (is_causal path), then a 4-token chunk after a prefix (explicit
    # mask path), then single tokens (unmasked path); every chunk's logits must equal the full forward's.
    config = small_config(n_kv_head=n_kv_head)
    model = random_model(config, seed=10 + n_kv_head)
    B, T = 2, 14
    idx = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(B, config.n_kv_head, T, config.head_dim, config.n_layer)
        pieces, start = [], 0
        for size in (5, 4, 1, 1, 1, 1, 1):
            pieces.append(model(idx[:, start:start + size], kv_cache=cache))
            start += size
            assert cache.pos == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_generate_greedy_matches_full_forward(n_kv_head):
    config = small_config(n_kv_head=n_kv_head, sequence_len=32)
    model = random_model(config, seed=20 + n_kv_head)
    prompt = [3, 14, 15, 9, 26, 5]
    num_new = 20

    # naive decoding: rerun the full forward on the whole sequence each step
    seq, naive_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(torch.tensor([seq]))[0, -1]
            naive_logits.append(logits)
            seq.append(int(logits.argmax()))
    naive = seq[len(prompt):]

    # Exact token equality is only meaningful if no step is a near-tie: check the top-2 gap of the naive
    # logits is far above the cache tolerance, so a 1e-6 reassociation error cannot flip an argmax.
    top2 = torch.stack(naive_logits).topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 10 * CACHE_ATOL

    cached = list(model.generate(prompt, num_new, temperature=0.0))
    assert cached == naive

    # the cached logits at each step match too (driving the cache by hand, as generate does)
    with torch.no_grad():
        cache = KVCache(1, config.n_kv_head, len(seq), config.head_dim, config.n_layer)
        step_logits = [model(torch.tensor([prompt]), kv_cache=cache)[0, -1]]
        for tok in naive[:-1]:
            step_logits.append(model(torch.tensor([[tok]]), kv_cache=cache)[0, -1])
    torch.testing.assert_close(torch.stack(step_logits), torch.stack(naive_logits), atol=CACHE_ATOL, rtol=0)


def test_generate_sampling():
    config = small_config()
    model = random_model(config)
    prompt = torch.tensor([[1, 2, 3]])
    a = list(model.generate(prompt, 12, temperature=1.0, seed=123))
    b = list(model.generate(prompt, 12, temperature=1.0, seed=123))
    assert a == b and len(a) == 12 and all(isinstance(t, int) and 0 <= t < config.vocab_size for t in a)
    # top_k=1 keeps only the argmax, so it is greedy decoding whatever the temperature
    assert list(model.generate(prompt, 12, temperature=2.0, top_k=1, seed=5)) == \
        list(model.generate(prompt, 12, temperature=0.0))
    assert list(model.generate([1, 2, 3], 0)) == []


# ----------------------------------------------------------------------------------------------------------
# init


def test_init():
    # A wider model so each matrix has thousands of entries and the statistics are sharp.
    config = GPTConfig(sequence_len=16, vocab_size=61, n_layer=2, n_embd=128, n_head=4, n_kv_head=2)
    torch.manual_seed(0)
    model = GPT(config)
    C = 128
    # std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)), by hand for each shape
    expected_std = {"transformer.wte.weight": 1.0}
    for i in range(2):
        p = f"transformer.h.{i}."
        expected_std[p + "attn.c_q.weight"] = 1 / math.sqrt(C)  # (128, 128)
        expected_std[p + "attn.c_k.weight"] = 1 / math.sqrt(C) * math.sqrt(64 / C)  # (64, 128)
        expected_std[p + "attn.c_v.weight"] = 1 / math.sqrt(C) * math.sqrt(64 / C)  # (64, 128)
        expected_std[p + "mlp.c_fc.weight"] = 1 / math.sqrt(C)  # (512, 128): fan_out > fan_in, factor 1
    zeros = ["lm_head.weight"] + [f"transformer.h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")]

    params = dict(model.named_parameters())
    assert set(params) == set(expected_std) | set(zeros)
    for name in zeros:
        assert torch.count_nonzero(params[name]) == 0, name
    for name, sigma in expected_std.items():
        w = params[name].detach().double().flatten()
        n = w.numel()  # >= 61*128 = 7808
        # For n iid N(0, sigma^2): the sample std has standard error ~ sigma/sqrt(2n), the mean sigma/sqrt(n).
        # A 6-standard-error band gives a false-failure probability ~2e-9 per check.
        assert abs(w.std().item() / sigma - 1) < 6 / math.sqrt(2 * n), name
        assert abs(w.mean().item()) < 6 * sigma / math.sqrt(n), name
        # normal, not uniform: a uniform with this std is bounded by sqrt(3)*sigma ~ 1.73 sigma, whereas
        # P(max of n >= 7808 normals stays under 2.5 sigma) = 0.9876^n < 1e-40.
        assert w.abs().max().item() > 2.5 * sigma, name


def test_meta_device_construction():
    config = small_config()
    with torch.device("meta"):
        meta_model = GPT(config)
    assert meta_model.cos.is_meta
    meta_model.to_empty(device="cpu")
    meta_model.init_weights()
    ref = GPT(config)
    assert torch.equal(meta_model.cos, ref.cos) and torch.equal(meta_model.sin, ref.sin)
    assert torch.count_nonzero(meta_model.lm_head.weight) == 0
    out = meta_model(torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("overrides, field", [
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(sequence_len=16.0), "sequence_len"),
    (dict(n_layer=True), "n_layer"),
    (dict(n_embd="32"), "n_embd"),
    (dict(n_embd=30), "n_embd"),  # not divisible by n_head=4
    (dict(n_kv_head=3), "n_kv_head"),  # does not divide n_head=4
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(n_embd=12, n_kv_head=1), "head_dim"),  # head_dim 3 is odd
])
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_forward_validation():
    config = small_config()
    model = GPT(config)
    with pytest.raises(ValueError, match="sequence_len"):
        model(torch.zeros(1, config.sequence_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))
    cache = KVCache(1, config.n_kv_head, 6, config.head_dim, config.n_layer)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache capacity"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    # with a cache, the limit is the cache / rotary table, not sequence_len
    big = KVCache(1, config.n_kv_head, 2 * config.sequence_len, config.head_dim, config.n_layer)
    assert model(torch.zeros(1, 2 * config.sequence_len, dtype=torch.long), kv_cache=big).shape[1] == 32
    over = model.rotary_seq_len + 1
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, over, dtype=torch.long),
              kv_cache=KVCache(1, config.n_kv_head, over, config.head_dim, config.n_layer))


# ----------------------------------------------------------------------------------------------------------
# FLOPs and loss


def test_estimate_flops():
    model = GPT(small_config())  # C=32, n_kv_head=2 -> kv width 16, V=61, L=2, H=4, D=8, T=16
    per_layer = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 128 * 32 + 32 * 128  # c_q c_k c_v c_proj c_fc c_proj
    wte = lm_head = 61 * 32
    assert model.num_params() == wte + lm_head + 2 * per_layer == 26_432
    assert model.estimate_flops() == 6 * (lm_head + 2 * per_layer) + 12 * 2 * 4 * 8 * 16 == 159_168
    # nanochat d12 default: 12*(12*768^2) + 50304*768 non-embedding params, attention 12*12*6*128*1024
    with torch.device("meta"):
        d12 = GPT(GPTConfig())
    assert d12.estimate_flops() == 6 * (12 * 12 * 768 ** 2 + 50304 * 768) + 12 * 12 * 6 * 128 * 1024 == 854_654_976


def test_loss_matches_manual_cross_entropy():
    config = small_config()
    model = random_model(config)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, config.vocab_size, (3, config.sequence_len), generator=g)
    targets = torch.randint(0, config.vocab_size, idx.shape, generator=g)
    ignore = torch.rand(idx.shape, generator=g) < 0.3
    targets[ignore] = -1
    assert 0 < ignore.sum() < ignore.numel()
    with torch.no_grad():
        logits = model(idx).double()
        loss_mean = model(idx, targets)
        loss_sum = model(idx, targets, loss_reduction="sum")
        loss_none = model(idx, targets, loss_reduction="none")
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = targets != -1
    nll = torch.zeros(idx.shape, dtype=torch.float64)
    nll[valid] = -logp[valid, targets[valid]]
    # fp32 log-softmax over 61 logits of magnitude <= 15: relative error ~1e-6; 1e-5 leaves margin
    torch.testing.assert_close(loss_mean.double(), nll.sum() / valid.sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_sum.double(), nll.sum(), rtol=1e-5, atol=0)
    assert loss_none.shape == idx.shape
    torch.testing.assert_close(loss_none.double(), nll, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# mixed precision smoke test (the CUDA path uses bf16 autocast; CPU autocast exercises the same dtype plumbing)


def test_bf16_autocast_smoke():
    config = small_config()
    model = random_model(config).train()
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, idx)
        loss.backward()
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert len(list(model.generate([1, 2, 3], 5, temperature=0.0))) == 5
    assert model.lm_head.weight.grad.dtype == torch.float32
