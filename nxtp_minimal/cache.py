"""Key/value cache for one-shot sampling: the shared prefix runs once, each step feeds only new tokens.

The official loop re-runs image tokens + prompt + every sampled token for every branch at every step.
Here the prefix of each image leaves its keys and values once, and the k branches of that image all
attend to that one copy. Per block the keys are laid out as one row,

    [ prefix of image 0 | ... | prefix of image B-1 | branch slots: B * k branches x T steps ]

and a boolean mask lets the new token of branch (b, i) see the prefix of image b plus the slots of
branch (b, i) written so far. All live branches go through the decoder together as one sequence of
new tokens, so a step costs k tokens, not k x (prefix + t) tokens.
"""

import torch


class BranchCache:
    """Keys and values of one decoder block: B prefixes of length L, then B * k branches x T slots."""

    def __init__(self, B, L, k, T, n_heads, head_dim, device, dtype):
        self.B, self.L, self.T = B, L, T
        shape = (1, n_heads, B * L + B * k * T, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = None  # where the next step's keys go; None: the next call is the prefix

    def update(self, k, v):
        """Store this call's keys and values [B or 1, H, S, hd]; return what the queries attend to."""
        if self.slots is None:  # prefix pass: images attend within themselves as usual
            H, hd = k.shape[1], k.shape[-1]
            self.keys[0, :, : self.B * self.L] = k.transpose(0, 1).reshape(H, -1, hd)
            self.values[0, :, : self.B * self.L] = v.transpose(0, 1).reshape(H, -1, hd)
            return k, v
        self.keys[0, :, self.slots] = k[0]
        self.values[0, :, self.slots] = v[0]
        return self.keys, self.values


def step_mask(B, L, k, T, branches, t, device):
    """[1, 1, N, B*L + B*k*T] bool: branch n sees its image's prefix and its own first t slots."""
    image = branches // k  # [N]
    prefix = torch.arange(B * L, device=device) // L  # image of each prefix column
    allowed_prefix = prefix[None, :] == image[:, None]  # [N, B*L]
    slot = torch.arange(B * k * T, device=device)
    allowed_branch = (slot[None, :] // T == branches[:, None]) & (slot[None, :] % T < t)  # [N, B*k*T]
    return torch.cat([allowed_prefix, allowed_branch], dim=1)[None, None]


def cached_sampler(decoder, x, prefix_mask, k, max_tokens):
    """Run the prefix x [B, L, D] once and return (first-step logits [B, V], step function).

    The step function has `sampling.one_shot`'s signature: it embeds the newest token of every live
    branch, decodes them as one sequence against the cache and returns logits for all B * k branches
    (zeros for finished ones, which one_shot ignores).
    """
    B, L, _ = x.shape
    T = max_tokens - 1  # the first token comes from the prefix; later ones are fed back one per step
    c = decoder.config
    caches = [BranchCache(B, L, k, T, c.n_heads, c.head_dim, x.device, x.dtype) for _ in decoder.layers]
    first = decoder(x, prefix_mask, caches=caches, last_only=True)  # [B, V]

    @torch.inference_mode()
    def step(tokens, live):
        t = tokens.shape[1]  # the newest token is branch token t - 1, at position L + t - 1
        branches = live.nonzero()[:, 0]  # [N], finished branches leave the batch
        for cache in caches:
            cache.slots = branches * T + (t - 1) + B * L
        h = decoder.tok_embeddings(tokens[branches, -1])[None]  # [1, N, D]
        positions = torch.full((len(branches),), L + t - 1)
        mask = step_mask(B, L, k, T, branches, t, x.device)
        logits = decoder(h, mask, positions, caches)[0]  # [N, V]
        out = logits.new_zeros(B * k, logits.shape[-1])
        out[branches] = logits
        return out

    return first, step
