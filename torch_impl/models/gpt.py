"""
GPT model in the style of nanochat (https://github.com/karpathy/nanochat), written so that a nanochat
base-model state dict loads into it unchanged. The math is pinned down in .specs/gpt_math.md; in short:

- token embedding, then a parameter-free RMSNorm (no learnable gains anywhere, no biases anywhere)
- pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x))
- rotary position embeddings, half-split (not interleaved), base 10000 (RoPE, arXiv 2104.09864);
  no learned positional embeddings
- QK-norm: RMSNorm over the head dim of q and k, applied after rotary (arXiv 2010.04245)
- grouped-query attention, query head h reads kv head h // (n_head // n_kv_head) (GQA, arXiv 2305.13245)
- ReLU² MLP with 4x expansion (arXiv 2109.08668)
- final norm, untied lm_head, logits in float32 soft-capped at 15 * tanh(logits / 15)

Construction and init: GPT(config) builds the modules *and* calls init_weights(), so a freshly built model
is always correctly initialised. For the meta-device / FSDP path, build under torch.device("meta"), then
model.to_empty(device=...) and call model.init_weights() again: it re-draws every parameter and recomputes
the (non-persistent) rotary buffers, which to_empty() leaves uninitialised.

Inference: KVCache holds preallocated per-layer keys/values; GPT.generate is a Python generator that
yields one new token id (int) at a time.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

SOFTCAP = 15.0
ROTARY_BASE = 10000


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # number of query heads
    n_kv_head: int = 6  # number of key/value heads (GQA; n_kv_head == n_head is plain MHA)
    n_embd: int = 768

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            # bool is an int subclass; True as a layer count is almost certainly a bug
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{f.name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"GPTConfig.n_head: head_dim = n_embd // n_head = {self.head_dim} must be even "
                "(rotary rotates the two halves of each head against each other)"
            )

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def norm(x):
    # Parameter-free RMSNorm. eps=None means torch.finfo(x.dtype).eps: the float32 epsilon of the spec for
    # fp32 inputs, and exactly what nanochat does for the bf16 activations it sees under autocast.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); cos/sin: (1, T, 1, D/2). Half-split convention: dim j is paired with dim j + D/2.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    # cos/sin are fp32, so under autocast the product is promoted; cast back so k/v (and the KV cache) keep
    # one dtype.
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def precompute_rotary(seq_len, head_dim, base=ROTARY_BASE, device=None):
    """cos, sin of shape (1, seq_len, 1, head_dim // 2), float32, for absolute positions 0..seq_len-1."""
    channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel_range / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    angle = torch.outer(t, inv_freq)
    return angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]


class KVCache:
    """
    Keys/values of every layer for a batch of sequences, preallocated to max_len positions.

    Storage is allocated on the first insert, with the dtype/device of the keys it receives: under bf16
    autocast the keys are bf16, and a cache of a different dtype would make SDPA reject the mix.
    `pos` counts the positions already written; GPT.forward advances it once per call, after all layers.
    """

    def __init__(self, batch_size, num_kv_heads, max_len, head_dim, num_layers):
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("max_len", max_len),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache.{name} must be a positive int, got {value!r}")
        self.shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.batch_size, self.num_kv_heads, self.max_len = batch_size, num_kv_heads, max_len
        self.head_dim, self.num_layers = head_dim, num_layers
        self.k = self.v = None
        self.pos = 0

    def reset(self):
        self.pos = 0

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (B, H_kv, T, D) at [pos, pos+T) of layer `layer_idx`; return views of [0, pos+T)."""
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        self.k[layer_idx, :, :, t0:t1] = k
        self.v[layer_idx, :, :, t0:t1] = v
        return self.k[layer_idx, :, :, :t1], self.v[layer_idx, :, :, :t1]

    def advance(self, num_tokens):
        self.pos += num_tokens


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm after rotary, as nanochat does
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        prefix_len = 0
        if kv_cache is not None:
            prefix_len = kv_cache.pos
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)

        # enable_gqa makes SDPA map query head h to kv head h // (n_head // n_kv_head) without materialising
        # repeated k/v. Three cases, because is_causal=True aligns the mask to the top-left corner and is only
        # right when queries and keys start at the same position:
        if prefix_len == 0:
            # training, or a prefill into an empty cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif T == 1:
            # one new token: it may see every cached position and itself, so no mask at all
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
        else:
            # a chunk of T tokens after a prefix: query i (absolute position prefix_len + i) sees keys 0..prefix_len + i
            q_pos = torch.arange(prefix_len, prefix_len + T, device=q.device)[:, None]
            k_pos = torch.arange(prefix_len + T, device=q.device)[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=True)

        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are tiny, so (like nanochat) precompute 10x the training length: enough headroom for
        # generation past sequence_len. Non-persistent, so they stay out of the state dict and nanochat
        # checkpoints load with strict=True.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = precompute_rotary(self.rotary_seq_len, config.head_dim, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat init. Safe to call again after to_empty(): redraws all params and the rotary buffers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)), arXiv 2310.17813: the extra factor keeps
                # the spectral norm from growing for narrow (fan_out < fan_in) maps such as c_k/c_v under GQA.
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                # the norm right after the embedding makes its scale irrelevant to the forward pass
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        # Zero the maps that write into the residual stream and the classifier: every block starts as the
        # identity and the initial logits are exactly uniform.
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = precompute_rotary(self.rotary_seq_len, self.config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token of a training step (fwd + bwd), as nanochat counts them (PaLM, arXiv 2204.02311):
        6 per non-embedding parameter (the embedding is a lookup, not a matmul) plus the attention
        score/value matmuls, 12 * n_layer * n_head * head_dim * sequence_len."""
        c = self.config
        nparams_embedding = self.transformer.wte.weight.numel()
        return float(6 * (self.num_params() - nparams_embedding)
                     + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx: (B, T) integer tokens. Returns float32 logits (B, T, vocab_size) when targets is None,
        else the cross-entropy loss (ignore_index=-1) reduced with loss_reduction ("mean", "sum", or
        "none", which gives a (B, T) tensor). With kv_cache, positions continue from kv_cache.pos and the
        cache is advanced by T.
        """
        if not isinstance(idx, torch.Tensor) or idx.dtype == torch.bool or idx.is_floating_point() \
                or idx.is_complex():
            raise ValueError(f"idx must be an integer tensor, got {getattr(idx, 'dtype', type(idx))}")
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx must contain at least one token per row (T == 0)")
        if kv_cache is None:
            if T > self.config.sequence_len:
                raise ValueError(f"sequence length T={T} exceeds config.sequence_len={self.config.sequence_len}")
            pos = 0
        else:
            pos = kv_cache.pos
            if kv_cache.batch_size != B or kv_cache.num_layers != self.config.n_layer \
                    or kv_cache.num_kv_heads != self.config.n_kv_head or kv_cache.head_dim != self.config.head_dim:
                raise ValueError(f"kv_cache shape {kv_cache.shape} does not fit this model and batch size {B}")
            if pos + T > kv_cache.max_len:
                raise ValueError(f"positions up to {pos + T} exceed the KV cache capacity {kv_cache.max_len}")
            if pos + T > self.rotary_seq_len:
                raise ValueError(f"positions up to {pos + T} exceed the rotary cache length {self.rotary_seq_len}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must match idx shape {tuple(idx.shape)}")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")

        cos_sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)

        # The lm_head matmul follows autocast (bf16 on GPU, as in nanochat: it is the largest matmul of a
        # small model); softcap and loss are done in float32.
        logits = self.lm_head(x).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=None):
        """
        Autoregressive sampling for one sequence with a KV cache. A Python generator: yields each new token
        id (int) as soon as it is sampled, so callers can stream; list(model.generate(...)) gives them all.

        tokens: prompt as list[int] or a (T,) / (1, T) integer tensor. temperature 0 means greedy argmax.
        top_k keeps only the k most likely tokens before sampling. seed makes sampling reproducible without
        touching the global RNG.
        """
        if isinstance(tokens, torch.Tensor):
            if tokens.ndim == 2 and tokens.size(0) == 1:
                tokens = tokens[0]
            if tokens.ndim != 1:
                raise ValueError(f"tokens tensor must have shape (T,) or (1, T), got {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        tokens = list(tokens)
        if len(tokens) == 0:
            raise ValueError("generate needs a non-empty prompt")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if max_tokens == 0:
            return
        # the last sampled token is never fed back, hence the -1
        max_len = len(tokens) + max_tokens - 1
        if max_len > self.rotary_seq_len:
            raise ValueError(f"prompt + max_tokens needs {max_len} positions, rotary cache has {self.rotary_seq_len}")

        device = self.get_device()
        rng = None
        if seed is not None:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        c = self.config
        kv_cache = KVCache(1, c.n_kv_head, max_len, c.head_dim, c.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.forward(ids, kv_cache=kv_cache)[:, -1, :]  # prefill the whole prompt at once
        for i in range(max_tokens):
            next_id = sample_next_token(logits, temperature, top_k, rng)
            yield next_id.item()
            if i + 1 < max_tokens:
                logits = self.forward(next_id, kv_cache=kv_cache)[:, -1, :]


def sample_next_token(logits, temperature=1.0, top_k=None, rng=None):
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        return idx.gather(-1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)
