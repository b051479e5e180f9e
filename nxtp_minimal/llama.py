"""The language decoder (NXTP step 5): LLaMA-2 blocks, truncated to the first N.

Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...), so a
LLaMA-2 state dict loads after `truncate` with no renaming.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LanguageConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Meta normalises in float32 and casts back before the weight; half precision drifts otherwise.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(head_dim: int, positions, theta: float = 10000.0, device=None):
    """cos and sin, each [S, head_dim // 2] float32: position p turns pair i by p * theta^(-2i/head_dim).

    positions: a count n (positions 0 .. n - 1) or a tensor of positions [S].
    """
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = torch.outer(positions.float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x [B, S, H, hd] by position. Meta's layout: the pairs are (x0, x1), (x2, x3), ... of each head.

    cos and sin are [S, hd // 2]. Real arithmetic instead of complex numbers, computed in float32.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [B, S, H, hd/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LanguageConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, cos, sin, bias, cache=None, columns=None, need_weights=False):
        """x [B, S, D]; bias: additive [B or 1, 1, S, S_keys] in x's dtype (0 or -inf), or None.

        cache: this block's `cache.KVCache`; without `columns` this call is the prefix and fills it, with
        columns [B, S] the new keys and values go to those cache columns and the queries see the whole
        cache. Returns the output [B, S, D] and, if need_weights, the attention probabilities
        [B, H, S, S_keys] in float32 (else None).
        """
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, hd]
        if cache is not None:
            k, v = cache.prefill(k, v) if columns is None else cache.append(k, v, columns)
        probs = None
        if need_weights:  # the same attention written out, to keep the probabilities
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5  # [B, H, S, S_keys]
            probs = (scores if bias is None else scores + bias).float().softmax(dim=-1)
            out = probs.type_as(v) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, S, hd]
        return self.wo(out.transpose(1, 2).reshape(B, S, -1)), probs


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LanguageConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x, cos, sin, bias, cache=None, columns=None, need_weights=False):
        a, probs = self.attention(self.attention_norm(x), cos, sin, bias, cache, columns, need_weights)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), probs


class Decoder(nn.Module):
    """Token embeddings, the kept blocks, the final RMSNorm and the output layer."""

    def __init__(self, config: LanguageConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Built once and indexed by position on the device, like Meta's freqs_cis and gpt-fast's
        # (llama/model.py Transformer); 2 x max_seq_len positions, as Meta's table.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.build_rope()

    def build_rope(self):
        """(Re)compute the rotary table in float32 on the device of the weights."""
        c = self.config
        self.rope_cos, self.rope_sin = rope_table(c.head_dim, 2 * c.max_seq_len, c.rope_theta, self.output.weight.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) would cast the table too, and to_empty would leave it empty: rebuild it after any move,
        # in float32, as Meta keeps its angles whatever dtype the weights are
        super()._apply(fn, recurse)
        self.build_rope()
        return self

    def blocks(self, h, positions, mask=None, cache=None, columns=None, need_weights=False):
        """The blocks and the final norm: embeddings h [B, S, D] -> normalised hidden states [B, S, D].

        positions [S] (a tensor on h's device, each below 2 x max_seq_len) are the RoPE positions: Meta's
        start_pos, generalised, because one sampling step feeds the newest token of every branch side by
        side, all at the same position. mask: boolean [B or 1, 1, S, S_keys], True where a query may
        attend; it becomes an additive bias once here, not in every block. cache and columns: see
        `Attention.forward` and cache.py. Returns (hidden, per-block attention probabilities or None).
        """
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        bias = None if mask is None else torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(
            ~mask.to(h.device), float("-inf"))
        probs = []
        for i, layer in enumerate(self.layers):
            h, p = layer(h, cos, sin, bias, None if cache is None else cache[i], columns, need_weights)
            probs.append(p)
        return self.norm(h), (probs if need_weights else None)

    def forward(self, x, mask=None, last_only=False):
        """x: token ids [B, S] or input embeddings [B, S, D], at positions 0 .. S - 1.

        Returns logits [B, S, V] ([B, V] if last_only). For cached decoding and attention probabilities,
        call `blocks` and `output`.
        """
        h = self.tok_embeddings(x) if x.dim() == 2 else x
        if h.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(
                f"{h.shape[1]} positions are beyond what this decoder supports ({self.rope_cos.shape[0]} = 2 x "
                "max_seq_len); raise language.max_seq_len in the config"
            )
        h, _ = self.blocks(h, torch.arange(h.shape[1], device=h.device), mask)
        return self.output(h[:, -1] if last_only else h)


def truncate(state_dict: dict, n_layers: int) -> dict:
    """Keep embeddings, blocks 0 .. n_layers - 1, the final norm and the output layer (NXTP step 5).

    Works on a Meta-named LLaMA state dict with any number of blocks; later blocks are dropped.
    """
    available = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
    if n_layers < 1 or n_layers > len(available):
        raise ValueError(f"cannot keep {n_layers} blocks: the state dict has {len(available)}")
    kept = {}
    for key, value in state_dict.items():
        if key.startswith("layers."):
            if int(key.split(".")[1]) < n_layers:
                kept[key] = value
        elif key.split(".")[0] in ("tok_embeddings", "norm", "output"):
            kept[key] = value
    return kept
