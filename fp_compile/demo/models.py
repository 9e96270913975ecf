"""A small Llama-style decoder written by hand (gpt-fast style), for the demo, examples and tests.

RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP. Attention calls
``F.scaled_dot_product_attention`` the two ways a serving stack does:

* prefill (``S > 1``): ``is_causal=True, enable_gqa=True`` on the fresh keys and values, the
  shape the flashprefill backend rewrites;
* decode (``S == 1``): the query against the whole static KV cache with a boolean mask of the
  filled positions, which the backend must leave alone.

Without ``setup_caches`` the model runs prefill only (no cache is written).
Nothing here downloads weights: models are random-init, see ``plant_attention_structure`` for
making their attention look like a trained model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate_size: int = 512
    max_seq_len: int = 8192
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, S, D) by position angles; cos, sin (S, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        # -1 heads: under tensor parallelism (fp_compile.demo.tp) the projections give this
        # rank's heads only, fewer than the model's n_heads / n_kv_heads.
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if S > 1:
            # Prefill from an empty cache: causal attention over the prompt itself.
            if self.kv_cache is not None:
                self.kv_cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.kv_cache is None:
                raise RuntimeError("decoding one token needs model.setup_caches(...) first")
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            filled = torch.arange(k_all.shape[2], device=x.device) <= input_pos
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=filled.view(1, 1, 1, -1),
                                               enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x, cos, sin, input_pos):
        x = x + self.attention(self.attention_norm(x), cos, sin, input_pos)
        h = self.ffn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Transformer(nn.Module):
    """Llama-style decoder. ``forward(idx (B, S) int64, input_pos (S,) int64 | None) -> logits
    (B, S, vocab)``; ``input_pos`` defaults to ``0..S-1`` (a prefill)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def setup_caches(self, batch: int, max_seq_len: int | None = None) -> None:
        """Allocate static KV caches so the model can decode after a prefill."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        p = self.lm_head.weight
        for layer in self.layers:
            # the kv heads this process holds: all of them, or its shard (fp_compile.demo.tp)
            w = layer.attention.k_proj.weight
            w = w.to_local() if hasattr(w, "to_local") else w
            n_kv_heads = w.shape[0] // self.args.head_dim
            layer.attention.kv_cache = KVCache(batch, n_kv_heads, max_seq_len,
                                               self.args.head_dim, p.dtype, p.device)

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, S, dim), without the LM head."""
        if input_pos is None:
            input_pos = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(idx, input_pos))


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             forward=None) -> torch.Tensor:
    """Greedy decoding: one prefill of ``prompt`` (B, S), then ``max_new_tokens`` decode steps.

    ``forward`` is the callable to run (e.g. a compiled ``model``); default ``model`` itself.
    Returns (B, S + max_new_tokens).
    """
    forward = model if forward is None else forward
    B, S = prompt.shape
    model.setup_caches(B, S + max_new_tokens)
    pos = torch.arange(S, device=prompt.device)
    token = forward(prompt, pos)[:, -1].argmax(-1, keepdim=True)
    out = [prompt, token]
    for i in range(max_new_tokens - 1):
        pos = torch.tensor([S + i], device=prompt.device)
        token = forward(token, pos)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def _attention_parts(model: nn.Module):
    """(token embedding, [(q_proj, k_proj, n_heads, n_kv_heads, head_dim), ...]) for the
    built-in Transformer and Hugging Face Llama-family models."""
    if isinstance(model, Transformer):
        a = model.args
        return model.embed_tokens, [(b.attention.q_proj, b.attention.k_proj, a.n_heads,
                                     a.n_kv_heads, a.head_dim) for b in model.layers]
    base = getattr(model, "model", model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return base.embed_tokens, [(l.self_attn.q_proj, l.self_attn.k_proj, cfg.num_attention_heads,
                                cfg.num_key_value_heads, head_dim) for l in base.layers]


@torch.no_grad()
def plant_attention_structure(model: nn.Module, *, sink_token: int = 0, strength: float = 1.0,
                              seed: int = 0) -> nn.Module:
    """Give a random-init model the attention structure trained long-context models show.

    Random weights attend almost uniformly, which no sparse method can skip and no real model
    does. This adds rank-one terms to the weights, in place, so that every layer's attention
    logits gain two bonuses (in units of the softmax's logits):

    * a local window, ``8 * strength`` at distance 0 and decaying with distance: every token
      embedding shares a direction ``u`` that the q and k projections both map to a vector ``a``
      living in RoPE's high-frequency pairs, and RoPE turns ``a . a`` into
      ``sum_i |a_i|^2 cos((t - s) theta_i)``;
    * an attention sink on ``sink_token`` (``10 * strength``): its embedding carries a second
      direction ``w``, which the k projection maps to a vector ``b`` in RoPE's lowest-frequency
      pairs (nearly position independent) that every query also carries.

    Works on the built-in ``Transformer`` and on Hugging Face Llama / Qwen2 / Mistral models
    (their random init, with small residual updates, keeps ``u`` and ``w`` in every layer's input).
    Returns ``model``.
    """
    embed, layers = _attention_parts(model)
    gen = torch.Generator().manual_seed(seed)
    dim = embed.weight.shape[1]
    dev, dt = embed.weight.device, embed.weight.dtype

    def unit(n: int) -> torch.Tensor:
        x = torch.randn(n, generator=gen)
        return x / x.norm()

    u = unit(dim)
    w = unit(dim)
    w = w - (w @ u) * u
    w = w / w.norm()
    emb_std = embed.weight.float().std().item()
    embed.weight.add_((2.0 * emb_std * math.sqrt(dim) * u).to(dev, dt))
    embed.weight[sink_token].add_((6.0 * emb_std * math.sqrt(dim) * w).to(dev, dt))
    n = min(256, model.args.max_seq_len) if isinstance(model, Transformer) else 256
    sample = torch.randint(0, embed.weight.shape[0], (1, n), generator=gen).to(dev)
    sample[sink_token == sample] = (sink_token + 1) % embed.weight.shape[0]
    sample[:, 0] = sink_token

    def coordinates(q_proj) -> tuple[float, float]:
        """u-coordinate of ordinary tokens and w-coordinate of the sink in q_proj's input,
        measured on a sample prompt with the layers below already planted."""
        seen = {}
        handle = q_proj.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
        try:
            model(sample)
        finally:
            handle.remove()
        h = seen["h"][0].float()
        return (h[1:] @ u.to(dev)).median().item(), (h[0] @ w.to(dev)).item()

    for q_proj, k_proj, n_heads, n_kv_heads, head_dim in layers:
        cu, cw = coordinates(q_proj)
        pairs = head_dim // 2
        scale = 1.0 / math.sqrt(head_dim)
        hi = torch.zeros(head_dim)
        band = slice(pairs // 4, max(pairs // 4 + 1, 5 * pairs // 8))
        hi[band] = 1.0                                   # RoPE's middle frequencies
        hi[pairs:][band] = 1.0
        lo = torch.zeros(head_dim)
        lo[pairs - max(1, pairs // 8): pairs] = 1.0      # and its lowest
        lo[head_dim - max(1, pairs // 8):] = 1.0
        a = hi * torch.randn(head_dim, generator=gen).sign()
        a = a / a.norm() * math.sqrt(8.0 * strength / scale)
        b = lo * torch.randn(head_dim, generator=gen).sign()
        b = b / b.norm() * math.sqrt(10.0 * strength / scale)
        q_proj.weight.add_(torch.outer((a + b).repeat(n_heads), u / cu).to(dev, dt))
        k_proj.weight.add_(torch.outer(a.repeat(n_kv_heads), u / cu).to(dev, dt))
        k_proj.weight.add_(torch.outer(b.repeat(n_kv_heads), w / cw).to(dev, dt))
    return model


def build_hf_llama(args: ModelArgs, family: str = "llama"):
    """A random-init Hugging Face model of ``family`` (llama, qwen2, mistral) shaped like
    ``args``, with SDPA attention. Needs ``transformers``."""
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
    }
    if family not in classes:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(classes)}")
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    config = config_cls(vocab_size=args.vocab_size, hidden_size=args.dim,
                        intermediate_size=args.intermediate_size,
                        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                        num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
                        rope_theta=args.rope_theta, rms_norm_eps=args.norm_eps,
                        attn_implementation="sdpa")
    if family == "mistral":
        config.sliding_window = None
    return model_cls(config).eval()
