"""Key/value cache for one-shot sampling: the prefix runs once, each step feeds only the newest tokens.

The official loop re-runs image tokens + prompt + every sampled token for every branch at every step.
Here each image's prefix leaves its keys and values once, and that image's k branches all attend to
that one copy. Per decoder block and per image, the keys are laid out as one row,

    [ prefix (L columns) | branch 0: T slots | branch 1: T slots | ... | branch k-1: T slots ]

so the cache is [B, H, L + k * T, hd] and a step of B images costs B times a step of one. At decode
step t the newest token of each live branch goes in (m <= k rows per image, all at RoPE position
L + t - 1, where the official loop puts it too), writes its key and value into its branch's slot t - 1,
and attends to the prefix plus its own first t slots: exactly the keys the official loop recomputes.

The bookkeeping (`plan_step`, `CachedSampler`) does not know what runs the decoder: `torch_sampler`
plugs in this package's PyTorch decoder, and the ONNX runner plugs in its exported graphs.
"""

import torch


class KVCache:
    """Keys and values of one decoder block for B images: [B, H, L + k * T, hd] each."""

    def __init__(self, B, L, k, T, n_heads, head_dim, device, dtype):
        self.L = L
        self.keys = torch.zeros(B, n_heads, L + k * T, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)

    def prefill(self, k, v):
        """Store the prefix's keys and values [B, H, L, hd]; the prefix attends only to itself."""
        self.keys[:, :, : self.L] = k
        self.values[:, :, : self.L] = v
        return k, v

    def append(self, k, v, columns):
        """Store new keys and values [B, H, m, hd] at `columns` [B, m]; the new queries see the whole row."""
        index = columns[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        self.keys.scatter_(2, index, k)
        self.values.scatter_(2, index, v)
        return self.keys, self.values

    def reorder(self, parents):
        """Branch i of image b takes over the slots of branch parents[b, i] (beam search), parents [B, k]."""
        for t in (self.keys, self.values):
            B, H, _, hd = t.shape
            slots = t[:, :, self.L :].unflatten(2, (parents.shape[1], -1))  # [B, H, k, T, hd]
            index = parents[:, None, :, None, None].expand(B, H, -1, slots.shape[3], hd)
            t[:, :, self.L :] = slots.gather(2, index).flatten(2, 3)


def plan_step(live, t: int, L: int, T: int):
    """Which branches decode step t feeds, where their keys go, and what they may see.

    live [B, k] bool; t = tokens each branch holds, so the newest is branch token t - 1.
    Returns rows [B, m]: the branch of each fed row, live branches first, m = the most live branches of
    any image (an image with fewer fills its last rows with finished branches, whose output is dropped);
    columns [B, m]: the cache column of each fed token; mask [B, 1, m, L + k * T] bool: the prefix and
    the branch's own first t slots.
    """
    B, k = live.shape
    m = int(live.sum(dim=1).max())
    rows = torch.argsort(live.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
    columns = L + rows * T + (t - 1)
    slot = torch.arange(k * T, device=live.device)
    own = (slot // T == rows[:, :, None]) & (slot % T < t)  # [B, m, k * T]
    mask = torch.cat([own.new_ones(B, m, L), own], dim=2)[:, None]
    return rows, columns, mask


class CachedSampler:
    """First-step logits and a `step` function for `sampling.one_shot`, over any decoder engine.

    prefill() runs the prefix and returns the logits at its last position [B, V].
    append(tokens [B, m], position, mask, columns) feeds one token per row at RoPE position `position`
    and returns their logits [B, m, V] (see `plan_step` for mask and columns).
    """

    def __init__(self, B, L, k, T, prefill, append):
        self.B, self.L, self.k, self.T, self.append = B, L, k, T, append
        self.first = prefill()

    @torch.inference_mode()
    def step(self, tokens, live):
        """tokens [B * k, t] sampled so far, live [B * k] -> next-token logits [B * k, V].

        Rows of finished branches hold whatever was computed for them last, which one_shot ignores.
        """
        B, k, t = self.B, self.k, tokens.shape[1]
        rows, columns, mask = plan_step(live.view(B, k), t, self.L, self.T)
        newest = tokens.view(B, k, t)[:, :, -1].gather(1, rows)  # [B, m]
        logits = self.append(newest, self.L + t - 1, mask, columns)  # [B, m, V]
        out = logits.new_zeros(B, k, logits.shape[-1])
        out.scatter_(1, rows[:, :, None].expand_as(logits), logits)
        return out.view(B * k, -1)


def torch_sampler(decoder, x, prefix_mask, k: int, T: int, n_image: int = 0) -> CachedSampler:
    """A CachedSampler running `decoder` on the prefix embeddings x [B, L, D].

    T: decode steps at most. n_image > 0 also keeps, in `sampler.attention` [B, k, T, blocks, H, n_image],
    how much each fed token attends to each image patch (slot s: branch token s, fed at step s + 1).
    """
    B, L, _ = x.shape
    c = decoder.config
    cache = [KVCache(B, L, k, T, c.n_heads, c.head_dim, x.device, x.dtype) for _ in decoder.layers]
    attention = x.new_zeros(B, k, T, len(cache), c.n_heads, n_image, dtype=torch.float32) if n_image else None

    def prefill():
        return decoder(x, prefix_mask, cache=cache, last_only=True)

    def append(tokens, position, mask, columns):
        record = [] if n_image else None
        logits = decoder(tokens, mask, torch.full((tokens.shape[1],), position), cache, columns, record=record)
        if n_image:
            branch, slot = (columns - L) // T, (columns - L) % T  # [B, m]
            image = torch.arange(B, device=x.device)[:, None]
            # [blocks, B, H, m, n_image] -> [B, m, blocks, H, n_image]
            attention[image, branch, slot] = torch.stack(record)[..., :n_image].permute(1, 3, 0, 2, 4)
        return logits

    sampler = CachedSampler(B, L, k, T, prefill, append)
    sampler.attention = attention
    sampler.reorder = lambda parents: [c.reorder(parents) for c in cache]
    return sampler
