"""LLaMA-style decoder-only language model in plain PyTorch.

Pre-norm transformer: RMSNorm, rotary position embeddings, grouped-query causal attention
through ``scaled_dot_product_attention`` and a SwiGLU MLP. Parameter names follow the usual
LLaMA layout (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``, ...) so optimizers
can pick target matrices by qualified name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Shapes of the LLaMA models in the GaLore paper (Zhao et al., 2024), plus "tiny" for CPU demos.
CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_layers=24, num_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_layers=24, num_heads=32),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
}
DEFAULT_MAX_SEQ_LEN = 256


@dataclass
class LlamaConfig:
    """Hyper-parameters of :class:`LlamaForCausalLM`. ``num_kv_heads=None`` means ``num_heads`` (no GQA)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def get_config(name: str, vocab_size: int, max_seq_len: int | None = None) -> LlamaConfig:
    """Named config from :data:`CONFIGS` (``"60m"``, ``"llama-7b"``, ...; case-insensitive).

    ``vocab_size`` comes from the tokenizer; ``max_seq_len`` defaults to 256 as in the GaLore paper.
    """
    key = name.lower().removeprefix("llama-")
    if key not in CONFIGS:
        known = ", ".join(CONFIGS)
        raise ValueError(f"unknown model config {name!r}; known: {known} (optionally prefixed with 'llama-')")
    return LlamaConfig(vocab_size=vocab_size, max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN, **CONFIGS[key])


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension, computed in fp32 and cast back to ``x.dtype``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def _rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None):
    """cos, sin: (max_seq_len, head_dim) fp32; frequency ``theta**(-2i/head_dim)`` repeated for both halves."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """Precomputed rotary tables, kept in fp32 whatever dtype the model is cast to."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = _rope_tables(head_dim, max_seq_len, theta)
        # Non-persistent: derived from the config, so checkpoints carry only learned weights.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # model.to(bfloat16) would round the angle tables; rebuild them in fp32 on the new device.
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = _rope_tables(self.head_dim, self.max_seq_len, self.theta, self.cos.device)
        return self

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (seq_len, head_dim) fp32."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + D/2)`` of x: (B, H, T, D) by position angles; cos, sin: (T, D)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); cos, sin: (T, head_dim)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Each kv head serves `groups` consecutive query heads.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm: input_ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1])
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the layer input; activations inside the layer are recomputed in backward.
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. ``forward(input_ids)`` -> logits; ``forward(input_ids, labels)`` -> mean loss.

    Set ``model.gradient_checkpointing = True`` to recompute each decoder layer in backward
    (only while ``model.training``).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear and embedding weights ~ N(0, initializer_range); norm weights = 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, shift_labels: bool = True
    ) -> torch.Tensor:
        """input_ids: (B, T) long. Without labels: logits (B, T, vocab) in the model dtype.

        With labels (B, T) long: mean next-token cross-entropy in fp32, positions labelled -100 ignored.
        ``shift_labels=True`` (the Hugging Face convention) treats labels as aligned with input_ids and
        scores logits[:, t] against labels[:, t + 1]. ``shift_labels=False`` takes labels that are already
        the next tokens (e.g. from :class:`fastgrad.data.TokenBatches`) and scores all T positions.
        """
        logits = self.lm_head(self.model(input_ids))
        if labels is None:
            return logits
        if shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
