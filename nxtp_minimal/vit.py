"""Image to tokens (NXTP step 1): OpenAI's CLIP ViT plus NXTP's projection into the decoder.

Parameter names are OpenAI CLIP's (`conv1`, `transformer.resblocks.{i}.attn.in_proj_weight`, ...), so
the visual half of a CLIP checkpoint loads as it is. The LayerNorms are PyTorch's own: its kernels
already accumulate in float32 for half-precision inputs, which is what CLIP's LayerNorm subclass is for.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


class QuickGELU(nn.Module):
    # The activation OpenAI trained CLIP with, x * sigmoid(1.702 x); exact GELU changes the features.
    # Written as silu(1.702 x) / 1.702: one fused kernel instead of three passes over the largest
    # activations of the encoder, which is most of a large batch's time on a CPU.
    def forward(self, x):
        return F.silu(1.702 * x).div_(1.702)


class Attention(nn.Module):
    """Multi-head self-attention with q, k, v packed in one matrix, as nn.MultiheadAttention stores them."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3C]
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, hd]
        x = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(x.transpose(1, 2).reshape(B, N, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionEncoder(nn.Module):
    """CLIP ViT as NXTP uses it: `ln_post` on every token, then a bias-free projection to `embed_dim`."""

    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        self.config = config
        w, scale = config.width, config.width**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.n_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, config.layers, config.heads)
        self.ln_post = nn.LayerNorm(w)
        # NXTP replaces CLIP's [width, 512] class-token projection with a Linear applied to all tokens.
        self.proj = nn.Linear(w, embed_dim, bias=False)

    def hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + P, width], class token first, after `ln_post`."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, P, width], patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + P, width]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + P, embed_dim]: every token in the decoder's embedding space."""
        return self.proj(self.hidden(pixels))
