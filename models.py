"""A Vision Transformer written from torch.nn primitives (Dosovitskiy et al., ICLR'21).

    from models import ViTConfig, VisionTransformer
    model = VisionTransformer(ViTConfig())          # the reference model: 6,268,810 parameters
    logits = model(images)                          # images: [N, 3, 32, 32], normalised floats
    logits, attentions = model.forward_with_attention(images)   # per-layer [N, heads, 65, 65]

The pieces, bottom up: `self_attention` (scaled dot-product attention, written out),
`MultiHeadSelfAttention` (one fused qkv projection, heads split by reshape, output projection),
`MLP`, `TransformerEncoderLayer` (pre-norm, residual connections) and `VisionTransformer`
(4x4 patches, class token, learned position embedding, encoder stack, LayerNorm + Linear head on
the class token).

Three attention paths compute the same function: `attention="math"` is the explicit formula above
(and the only one that can hand back the attention weights); `attention="sdpa"` calls
`F.scaled_dot_product_attention`, which dispatches to fused flash / memory-efficient kernels;
`attention="triton"` runs this repository's own kernels for short sequences (triton_attention.py, CUDA).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_PATHS = ("sdpa", "math", "triton")
INITS = ("timm", "pytorch")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    layers: int = 7
    hidden: int = 384
    mlp_hidden: int = 384
    heads: int = 12
    dropout: float = 0.0
    attention: str = "sdpa"
    mlp_final_gelu: bool = True  # the reference puts a GELU after both MLP linears; standard ViT has one
    init: str = "pytorch"  # pytorch (the reference's): nn.Linear's own init, unit-normal embeddings; timm: timm-style
    # truncated normal, std 0.02 cut at 2 std (timm cuts at +-2 absolute and starts the class token at std 1e-6)

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "layers", "hidden",
                     "mlp_hidden", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads: "
                             f"choose heads that divide hidden")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by patch size "
                             f"{self.patch_size}: choose a patch size that divides it")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {self.attention!r}")
        if self.attention == "triton":
            problem = triton_attention_problem(self.num_patches + 1, self.hidden // self.heads, self.dropout)
            if problem:
                raise ValueError(f"attention 'triton' {problem}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def triton_attention_problem(tokens: int, head_width: int, dropout: float):
    """Why attention="triton" cannot compute this model, or None. Imports Triton, which only it needs."""
    try:
        import triton_attention
    except ImportError as error:
        return (f"needs the triton package, which comes with PyTorch's CUDA builds on Linux ({error}): use the sdpa "
                f"attention")
    if dropout:
        return "has no attention dropout: use the sdpa or math attention with dropout"
    return triton_attention.shape_problem(tokens, head_width)


def self_attention(q, k, v, dropout: float = 0.0, training: bool = False):
    """softmax(q k^T / sqrt(d)) v over the last two dimensions; returns (output, weights)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, dropout, training) @ v, weights


def split_heads(qkv, heads: int):
    """The fused projection's [N, T, 3 * hidden] as q, k, v of [N, heads, T, hidden / heads] (views)."""
    batch, tokens, width = qkv.shape
    return qkv.reshape(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)


def merge_heads(out):
    """[N, heads, T, D] -> [N, T, heads * D]: each token's heads side by side, for the output projection."""
    batch, heads, tokens, width = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * width)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.attention = config.attention
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)
        if self.attention == "triton":
            import triton_attention  # the config has checked that it imports
            self.triton_attention = triton_attention.attention

    def forward(self, x, return_weights: bool = False):
        qkv = self.qkv(x)
        weights = None
        if self.attention == "triton" and not return_weights:
            out = self.triton_attention(qkv, self.heads)  # takes qkv and gives out as the projections lay them out
        else:
            q, k, v = split_heads(qkv, self.heads)
            if self.attention == "sdpa" and not return_weights:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
            else:
                out, weights = self_attention(q, k, v, self.dropout, self.training)
            out = merge_heads(out)
        return F.dropout(self.proj(out), self.dropout, self.training), weights


class MLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden, config.mlp_hidden)
        self.fc2 = nn.Linear(config.mlp_hidden, config.hidden)
        self.final_gelu = config.mlp_final_gelu
        self.dropout = config.dropout

    def forward(self, x):
        x = self.fc2(F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training))
        if self.final_gelu:
            x = F.gelu(x)
        return F.dropout(x, self.dropout, self.training)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden)
        self.attn = MultiHeadSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config)

    def forward(self, x, return_weights: bool = False):
        attended, weights = self.attn(self.norm1(x), return_weights)
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return x, weights


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        self.config = config
        patch_dim = config.in_channels * config.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, config.hidden)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden))
        self.layers = nn.ModuleList(TransformerEncoderLayer(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.head = nn.Linear(config.hidden, config.num_classes)
        if config.init == "timm":
            self.apply(_init_weights)
            for embedding in (self.class_token, self.pos_embed):
                _trunc_normal(embedding)
        else:  # Linear and LayerNorm keep PyTorch's defaults, embeddings torch.randn: what the reference did
            for embedding in (self.class_token, self.pos_embed):
                nn.init.normal_(embedding)

    def patchify(self, images):
        """[N, C, H, W] -> [N, patches, C*p*p], patches in row-major order, each flattened as (C, p, p)."""
        n, c, h, w = images.shape
        p = self.config.patch_size
        patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(n, (h // p) * (w // p), c * p * p)

    def embed(self, images):
        if images.shape[1:] != (self.config.in_channels, self.config.image_size, self.config.image_size):
            raise ValueError(f"expected images of shape [N, {self.config.in_channels}, {self.config.image_size}, "
                             f"{self.config.image_size}], got {list(images.shape)}")
        tokens = self.patch_embed(self.patchify(images))
        tokens = torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return F.dropout(tokens + self.pos_embed, self.config.dropout, self.training)

    def forward(self, images):
        x = self.embed(images)
        for layer in self.layers:
            x, _ = layer(x)
        return self.head(self.norm(x[:, 0]))

    def forward_with_attention(self, images):
        """Logits and each layer's attention weights [N, heads, T, T], always through the explicit math path."""
        x = self.embed(images)
        attentions = []
        for layer in self.layers:
            x, weights = layer(x, return_weights=True)
            attentions.append(weights)
        return self.head(self.norm(x[:, 0])), attentions


def _trunc_normal(tensor, std: float = 0.02):
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _init_weights(module):
    if isinstance(module, nn.Linear):
        _trunc_normal(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
