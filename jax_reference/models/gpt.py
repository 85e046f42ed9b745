"""A nanochat-style GPT in plain JAX: the slow, readable reference the PyTorch model is tested against.

Architecture (nanochat, https://github.com/karpathy/nanochat), exactly as in ``.specs/gpt_math.md``:

* token embedding ``wte`` followed by a parameter-free RMSNorm; no positional embedding table,
* ``n_layer`` pre-norm blocks ``x = x + attn(norm(x)); x = x + mlp(norm(x))``,
* attention with rotary position embeddings (RoPE, https://arxiv.org/abs/2104.09864) in the
  "half split" convention, then QK-norm (https://arxiv.org/abs/2010.04245) applied to queries and
  keys *after* the rotation, causal softmax with scale 1/sqrt(head_dim), and grouped-query attention
  (GQA, https://arxiv.org/abs/2305.13245): query head h reads kv head h // (n_head // n_kv_head),
* an MLP of width 4 * n_embd with the squared-ReLU activation (https://arxiv.org/abs/2109.08668),
* a final RMSNorm, an untied ``lm_head`` and a logit softcap ``15 * tanh(logits / 15)``,
* no biases anywhere; every RMSNorm uses eps = float32 machine epsilon.

Parameters are a flat ``dict[str, jax.Array]`` keyed by the PyTorch ``state_dict`` names and stored in
the PyTorch ``nn.Linear`` layout ``(out_features, in_features)``, so a checkpoint exported from the torch
side with safetensors loads here unchanged (see :func:`load_safetensors`).

This module optimises for being obviously correct, not for speed: attention is written out with an
explicit causal mask, every matmul runs at ``precision=HIGHEST`` (on GPU JAX would otherwise use TF32),
and the math is always carried out in float32 or wider. Parameters in a narrower dtype (bfloat16,
float16) are upcast to float32 on entry; float64 parameters (under ``jax.enable_x64(True)``) keep the
whole computation, logits and loss included, in float64, which is what the finite-difference gradient
tests use. There is no KV cache: positions always start at 0.

``forward`` and ``loss`` are pure functions of ``(params, idx[, targets])`` with ``config`` as a static
argument; ``forward_jit`` and ``loss_jit`` are the jitted versions, and gradients are simply::

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnames="config")
    value, grads = grad_fn(params, idx, targets, config=config)

Inputs are validated with ``ValueError``. Names, dtypes and shapes are static and are always checked;
token values can only be checked when they are concrete (not when ``idx`` is traced by ``jit``). Traced
out-of-range tokens or targets are not clamped silently: they turn the logits of the affected
sequence, or the loss, into NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

__all__ = [
    "GPTConfig",
    "param_shapes",
    "init_params",
    "forward",
    "loss",
    "forward_jit",
    "loss_jit",
    "load_safetensors",
    "NORM_EPS",
    "ROPE_BASE",
    "SOFTCAP",
    "IGNORE_INDEX",
]

# torch.nn.functional.rms_norm with eps=None uses torch.finfo(dtype).eps; the spec pins the float32
# value so that the fp64 reference computes the same function as an fp32 model.
NORM_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07
ROPE_BASE = 10000.0
SOFTCAP = 15.0
IGNORE_INDEX = -1

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters. Frozen (hence hashable), so it can be a static ``jit`` argument.

    There are deliberately no defaults: parity tests build the torch and JAX models from the same
    explicit values, and a silently differing default on one side would be a bug that hides.
    """

    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # bool is an Integral, but GPTConfig(n_head=True) is surely a mistake.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
            if value <= 0:
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
            # normalise numpy integers to int so that equal configs hash equally
            object.__setattr__(self, field.name, int(value))
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim = n_embd // n_head = {self.head_dim} must be even "
                f"(rotary splits it in halves); got n_embd={self.n_embd}, n_head={self.n_head}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in the order of the torch model's ``state_dict``."""
    C, D = config.n_embd, config.head_dim
    shapes = {"transformer.wte.weight": (config.vocab_size, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        shapes[f"{p}.attn.c_q.weight"] = (config.n_head * D, C)
        shapes[f"{p}.attn.c_k.weight"] = (config.n_kv_head * D, C)
        shapes[f"{p}.attn.c_v.weight"] = (config.n_kv_head * D, C)
        shapes[f"{p}.attn.c_proj.weight"] = (C, C)
        shapes[f"{p}.mlp.c_fc.weight"] = (4 * C, C)
        shapes[f"{p}.mlp.c_proj.weight"] = (C, 4 * C)
    shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def init_params(
    config: GPTConfig,
    key: jax.Array,
    dtype=jnp.float32,
    *,
    zero_init_outputs: bool = False,
) -> dict[str, jax.Array]:
    """Random parameters for tests.

    ``wte`` ~ N(0, 1); every Linear weight of shape (fan_out, fan_in) ~ N(0, std²) with
    std = 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in)), which keeps activations O(1).

    nanochat zero-initialises ``lm_head`` and every ``c_proj`` so that each block starts as the
    identity. We do not by default: with zero weights the gradients of everything upstream of them
    vanish at init, and a gradient or optimizer parity test would then compare zeros with zeros.
    ``zero_init_outputs=True`` gives the nanochat behaviour for those tensors.

    Values are drawn in float32 and then cast, so the same key gives the same (rounded) values in
    every dtype. float64 needs ``jax.enable_x64(True)``.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"dtype {dtype} is not available with jax_enable_x64 off; "
            "use `with jax.enable_x64(True):`"
        )
    shapes = param_shapes(config)
    sizes = [math.prod(shape) for shape in shapes.values()]
    # One draw for all tensors, sliced in param_shapes order: a single small program to compile,
    # rather than one random kernel per tensor shape.
    z = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    params, offset = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        w = z[offset : offset + size].reshape(shape)
        offset += size
        if name == "transformer.wte.weight":
            pass  # std 1
        elif zero_init_outputs and (name == "lm_head.weight" or name.endswith(".c_proj.weight")):
            w = np.zeros(shape, np.float32)
        else:
            fan_out, fan_in = shape
            w = w * np.float32(fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in)))
        params[name] = jnp.asarray(w.astype(dtype))
    return params


# ---------------------------------------------------------------------------------------------
# validation


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_params(params, config: GPTConfig) -> dict[str, jax.Array]:
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of name -> array, got {type(params).__name__}")
    expected = param_shapes(config)
    missing = [n for n in expected if n not in params]
    extra = sorted(n for n in params if n not in expected)
    if missing or extra:
        raise ValueError(
            f"params do not match the config: missing {missing}, unexpected {extra}"
        )
    for name, shape in expected.items():
        value = params[name]
        got = tuple(np.shape(value))
        if got != shape:
            raise ValueError(f"param {name!r} has shape {got}, expected {shape}")
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ValueError(
                f"param {name!r} must be floating point, got {jnp.result_type(value)}"
            )
    # a plain dict of arrays in canonical order, whatever Mapping and array types came in
    return {name: jnp.asarray(params[name]) for name in expected}


def _check_tokens(idx, config: GPTConfig):
    """Returns idx as an integer array of shape (B, T) after checking it against the config."""
    if not (isinstance(idx, jax.Array) or _is_traced(idx)):
        idx = np.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be an integer array, got dtype {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"idx must have shape (B, T), got {idx.shape}")
    if idx.shape[1] > config.sequence_len:
        raise ValueError(
            f"idx has T={idx.shape[1]} tokens, more than sequence_len={config.sequence_len}"
        )
    if not _is_traced(idx) and idx.size:
        # check before converting: x64-off JAX would wrap int64 values into int32
        lo, hi = np.min(idx), np.max(idx)
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(
                f"idx values must lie in [0, vocab_size={config.vocab_size}), "
                f"got min {lo} and max {hi}"
            )
    return jnp.asarray(idx)


def _check_targets(targets, idx_shape, config: GPTConfig):
    if not (isinstance(targets, jax.Array) or _is_traced(targets)):
        targets = np.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
    if targets.shape != tuple(idx_shape):
        raise ValueError(f"targets has shape {targets.shape}, expected idx's shape {idx_shape}")
    if not _is_traced(targets) and targets.size:
        t = np.asarray(targets)
        bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= config.vocab_size))
        if bad.any():
            raise ValueError(
                f"targets must be {IGNORE_INDEX} (ignored) or lie in "
                f"[0, vocab_size={config.vocab_size}), got {t[bad].ravel()[:5].tolist()}"
            )
    return jnp.asarray(targets)


# ---------------------------------------------------------------------------------------------
# the model


def _linear(x, w):
    # torch nn.Linear layout: w is (out_features, in_features) and y = x @ w.T
    return jnp.einsum("...i,oi->...o", x, w, precision=_HIGHEST)


def _norm(x):
    # parameter-free RMSNorm over the last axis, torch.nn.functional.rms_norm(x, (x.size(-1),))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + NORM_EPS)


def _rotary_cos_sin(T: int, D: int, dtype):
    # Computed in float32 whatever the compute dtype, as the spec says and with nanochat's formula:
    # at large positions t * inv_freq carries float32 rounding (~t * 6e-8), and the torch model
    # computes its tables the same way, so the reference should round alike.
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))  # (D/2,)
    angle = jnp.outer(jnp.arange(T, dtype=jnp.float32), inv_freq)  # (T, D/2)
    # broadcast over (B, T, heads, D/2)
    return (jnp.cos(angle)[None, :, None, :].astype(dtype),
            jnp.sin(angle)[None, :, None, :].astype(dtype))


def _rotary(x, cos, sin):
    # "half split" RoPE: channel j is paired with channel j + D/2 (not with its neighbour j + 1),
    # each pair rotated by the angle t * inv_freq[j].
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def _attention(params, prefix, h, config: GPTConfig, cos, sin):
    B, T, _ = h.shape
    H, Hkv, D = config.n_head, config.n_kv_head, config.head_dim
    q = _linear(h, params[f"{prefix}.c_q.weight"]).reshape(B, T, H, D)
    k = _linear(h, params[f"{prefix}.c_k.weight"]).reshape(B, T, Hkv, D)
    v = _linear(h, params[f"{prefix}.c_v.weight"]).reshape(B, T, Hkv, D)
    # QK-norm after rotary, as the spec says. The rotation preserves length, so the order only
    # changes rounding. After the norm |q| = |k| = sqrt(D), so every score lies in [-sqrt(D), sqrt(D)]
    # whatever the weights.
    q = _norm(_rotary(q, cos, sin))
    k = _norm(_rotary(k, cos, sin))
    # GQA: each kv head serves n_head // n_kv_head consecutive query heads, i.e. query head h reads
    # kv head h // group; repeat (not tile) gives exactly that order.
    group = H // Hkv
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=_HIGHEST) * (1.0 / math.sqrt(D))
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))  # query t sees keys s <= t
    # -inf rather than a large negative number: masked probabilities are then exactly 0, and the
    # diagonal is never masked, so no row is all -inf.
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # compute dtype is at least float32
    y = jnp.einsum("bhts,bshd->bthd", probs, v, precision=_HIGHEST).reshape(B, T, H * D)
    return _linear(y, params[f"{prefix}.c_proj.weight"])


def _mlp(params, prefix, h):
    u = jax.nn.relu(_linear(h, params[f"{prefix}.c_fc.weight"]))
    return _linear(jnp.square(u), params[f"{prefix}.c_proj.weight"])


def forward(params: Mapping[str, jax.Array], idx, config: GPTConfig) -> jax.Array:
    """Logits of shape (B, T, vocab_size) for tokens ``idx`` of shape (B, T), T <= sequence_len.

    The dtype is float32, or float64 when the parameters are float64. Position t only depends on
    tokens 0..t. The inputs are checked in Python and the math runs as one compiled program per
    (config, B, T, dtype), so calling this un-jitted is not slow; :data:`forward_jit` additionally
    traces the checks, which skips the host round trip of the token-range check.
    """
    params = _check_params(params, config)
    idx = _check_tokens(idx, config)
    return _forward(params, idx, config)


def loss(params: Mapping[str, jax.Array], idx, targets, config: GPTConfig) -> jax.Array:
    """Mean cross-entropy over positions whose target is not ``IGNORE_INDEX`` (-1).

    If every target is -1 the mean is over nothing; we return 0.0 (with zero gradients) rather than
    torch's NaN, so that a fully masked batch cannot poison an accumulated loss or an optimizer step.
    The result is a scalar in the dtype of :func:`forward`'s logits.
    """
    params = _check_params(params, config)
    idx = _check_tokens(idx, config)
    targets = _check_targets(targets, idx.shape, config)
    return _loss(params, idx, targets, config)


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, idx, config: GPTConfig):
    dtype = jnp.result_type(jnp.float32, *params.values())  # float32 or wider
    p = {name: w.astype(dtype) for name, w in params.items()}
    T = idx.shape[1]
    V = config.vocab_size

    # Embedding lookup. Traced out-of-range ids (including negative ones, which jnp would wrap
    # around) are mapped to V and read as NaN instead of being clamped silently. Through attention
    # (0 * NaN = NaN) this poisons the whole sequence, which is the point.
    bad = (idx < 0) | (idx >= V)
    x = jnp.take(p["transformer.wte.weight"], jnp.where(bad, V, idx), axis=0,
                 mode="fill", fill_value=jnp.nan)
    x = _norm(x)
    cos, sin = _rotary_cos_sin(T, config.head_dim, dtype)
    for i in range(config.n_layer):
        prefix = f"transformer.h.{i}"
        x = x + _attention(p, f"{prefix}.attn", _norm(x), config, cos, sin)
        x = x + _mlp(p, f"{prefix}.mlp", _norm(x))
    logits = _linear(_norm(x), p["lm_head.weight"])
    return SOFTCAP * jnp.tanh(logits / SOFTCAP)


@functools.partial(jax.jit, static_argnames="config")
def _loss(params, idx, targets, config: GPTConfig):
    logp = jax.nn.log_softmax(_forward(params, idx, config), axis=-1)
    keep = targets != IGNORE_INDEX
    V = config.vocab_size
    # Ignored positions read class 0 (any valid class) and are zeroed below; traced out-of-range
    # targets read NaN through mode="fill" so that the loss shows it.
    safe = jnp.where(keep, targets, 0)
    safe = jnp.where(keep & ((targets < 0) | (targets >= V)), V, safe)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1, mode="fill", fill_value=jnp.nan)
    nll = jnp.where(keep, -picked[..., 0], 0.0)
    count = jnp.sum(keep)
    return jnp.sum(nll) / jnp.maximum(count, 1).astype(nll.dtype)


forward_jit = jax.jit(forward, static_argnames="config")
forward_jit.__doc__ = "``jax.jit(forward, static_argnames='config')``: token values are not range-checked."
loss_jit = jax.jit(loss, static_argnames="config")
loss_jit.__doc__ = "``jax.jit(loss, static_argnames='config')``: token and target values are not range-checked."


# ---------------------------------------------------------------------------------------------
# checkpoints


def load_safetensors(path) -> dict[str, jax.Array]:
    """Load a safetensors file (e.g. the torch model's ``state_dict``) as ``dict[str, jax.Array]``.

    Names are kept as stored; :func:`forward` checks them against :func:`param_shapes`. Dtypes are
    kept too, except that float64 becomes float32 unless x64 is enabled (JAX's usual rule).

    ``safetensors.numpy`` (0.8) has no bfloat16 in its dtype table and fails on BF16 tensors, so those
    are decoded from the raw bytes (``safetensors.deserialize``) as ``ml_dtypes.bfloat16``, the dtype
    JAX uses. Exporting float32 avoids that path altogether and is what the parity tests should do.
    """
    with safetensors.safe_open(path, framework="np") as f:
        bf16 = {name for name in f.keys() if f.get_slice(name).get_dtype() == "BF16"}
    if not bf16:
        arrays = safetensors.numpy.load_file(path)
    else:
        arrays = {}
        with safetensors.safe_open(path, framework="np") as f:
            for name in f.keys():
                if name not in bf16:
                    arrays[name] = f.get_tensor(name)
        with open(path, "rb") as fh:
            raw = fh.read()
        for name, view in safetensors.deserialize(raw):
            if name in bf16:
                data = np.frombuffer(bytes(view["data"]), dtype="<u2").astype(np.uint16)
                arrays[name] = data.view(ml_dtypes.bfloat16).reshape(view["shape"])
    return {name: jnp.asarray(value) for name, value in arrays.items()}
