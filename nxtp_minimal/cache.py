"""Key/value cache for one-shot sampling: the prefix runs once, each step feeds only the newest tokens.

The official loop re-runs image tokens + prompt + every sampled token for every branch at every step.
Here each image's prefix leaves its keys and values once, and that image's k branches all attend to
that one copy. Per decoder block and per image, the keys are laid out as one row,

    [ prefix (L columns) | branch 0: T slots | branch 1: T slots | ... | branch k-1: T slots ]

so the cache is [B, H, L + k * T, hd] and a step of B images costs B times a step of one. At decode
step t the newest token of each branch goes in (all at RoPE position L + t - 1, where the official
loop puts it too), writes its key and value into its branch's slot t - 1, and attends to the prefix
plus its own first t slots: exactly the keys the official loop recomputes.

Two ways to run the steps:
- `CachedSampler` (dynamic) feeds only the branches still running, so its shapes change from step to
  step; the bookkeeping (`plan_step`) does not know what runs the decoder: `TorchEngine` plugs in this
  package's decoder, the ONNX runner its exported graphs. Fastest where each row costs compute (CPUs).
- `StaticSampler` (fixed shapes) feeds all k branches every step, finished ones included, with the
  step number as a device tensor: nothing is read back to the host, so a GPU can replay the step as
  one captured CUDA graph instead of launching each kernel from Python.
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
        """Store new keys and values [B, H, m, hd] at `columns` [B, m]; the new queries see the whole row.

        Under autocast the projections give half-precision keys for a cache in the weights' dtype: they are
        stored in the cache's dtype, as a recomputed sequence would hold them.
        """
        index = columns[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        self.keys.scatter_(2, index, k.to(self.keys.dtype))
        self.values.scatter_(2, index, v.to(self.values.dtype))
        return self.keys, self.values

    def reorder(self, parents):
        """Branch i of image b takes over the slots of branch parents[b, i] (beam search), parents [B, k]."""
        for t in (self.keys, self.values):
            B, H, _, hd = t.shape
            slots = t[:, :, self.L :].unflatten(2, (parents.shape[1], -1))  # [B, H, k, T, hd]
            index = parents[:, None, :, None, None].expand(B, H, -1, slots.shape[3], hd)
            t[:, :, self.L :] = slots.gather(2, index).flatten(2, 3)


def step_mask(rows, t, L: int, k: int, T: int):
    """[B, 1, m, L + k * T] bool: row j of image b (branch rows[b, j]) sees the prefix and that branch's
    first t slots. t may be a device tensor, so the mask is built without a host read."""
    slot = torch.arange(k * T, device=rows.device)
    own = (slot // T == rows[:, :, None]) & (slot % T < t)  # [B, m, k * T]
    return torch.cat([own.new_ones(*own.shape[:2], L), own], dim=2)[:, None]


def plan_step(live, t: int, L: int, T: int):
    """Which branches decode step t feeds, where their keys go, and what they may see.

    live [B, k] bool; t = tokens each branch holds, so the newest is branch token t - 1.
    Returns rows [B, m]: the branch of each fed row, live branches first, m = the most live branches of
    any image (an image with fewer fills its last rows with finished branches, whose output is dropped);
    columns [B, m]: the cache column of each fed token; mask [B, 1, m, L + k * T]: see `step_mask`.
    """
    k = live.shape[1]
    m = int(live.sum(dim=1).max())
    rows = torch.argsort(live.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
    return rows, L + rows * T + (t - 1), step_mask(rows, t, L, k, T)


class CachedSampler:
    """First-step logits and a `step` function for `sampling.one_shot`, over a decoder engine.

    engine.prefill() runs the prefix and returns the logits at its last position [B, V];
    engine.append(tokens [B, m], position, mask, columns) feeds one token per row at RoPE position
    `position` and returns their logits [B, m, V] (see `plan_step` for mask and columns).
    """

    def __init__(self, B, L, k, T, engine):
        self.B, self.L, self.k, self.T, self.engine = B, L, k, T, engine
        self.first = engine.prefill()

    @torch.inference_mode()
    def step(self, tokens, live):
        """tokens [B * k, t] sampled so far, live [B * k] -> next-token logits [B * k, V].

        Rows of finished branches hold whatever was computed for them last, which one_shot ignores.
        """
        B, k, t = self.B, self.k, tokens.shape[1]
        rows, columns, mask = plan_step(live.view(B, k), t, self.L, self.T)
        newest = tokens.view(B, k, t)[:, :, -1].gather(1, rows)  # [B, m]
        logits = self.engine.append(newest, self.L + t - 1, mask, columns)  # [B, m, V]
        out = logits.new_zeros(B, k, logits.shape[-1])
        out.scatter_(1, rows[:, :, None].expand_as(logits), logits)
        return out.view(B * k, -1)

    @torch.inference_mode()
    def reorder(self, parents):
        """Beam search moved its beams: see `KVCache.reorder`."""
        self.engine.reorder(parents)


class TorchEngine:
    """This package's decoder behind a `CachedSampler`, from the prefix embeddings x [B, L, D].

    T: decode steps at most. n_image > 0 also keeps, in `attention` [B, k, T, blocks, H, n_image], how
    much each fed token attends to each image patch (slot s: branch token s, fed at step s + 1).
    """

    def __init__(self, decoder, x, prefix_mask, k: int, T: int, n_image: int = 0):
        B, L, _ = x.shape
        c = decoder.config
        check_positions(decoder, L + T)
        self.decoder, self.x, self.prefix_mask, self.L, self.T, self.n_image = decoder, x, prefix_mask, L, T, n_image
        self.cache = [KVCache(B, L, k, T, c.n_heads, c.head_dim, x.device, x.dtype) for _ in decoder.layers]
        self.attention = None
        if n_image:
            self.attention = x.new_zeros(B, k, T, len(self.cache), c.n_heads, n_image, dtype=torch.float32)

    def prefill(self):
        h, _ = self.decoder.blocks(self.x, torch.arange(self.L, device=self.x.device), self.prefix_mask, self.cache)
        return self.decoder.output(h[:, -1])

    def append(self, tokens, position, mask, columns):
        d = self.decoder
        positions = torch.full((tokens.shape[1],), position, device=tokens.device)
        h, probs = d.blocks(d.tok_embeddings(tokens), positions, mask, self.cache, columns, bool(self.n_image))
        if self.n_image:
            B, L, T = tokens.shape[0], self.L, self.T
            branch, slot = (columns - L) // T, (columns - L) % T  # [B, m]
            image = torch.arange(B, device=tokens.device)[:, None]
            # [blocks, B, H, m, n_image] -> [B, m, blocks, H, n_image]
            self.attention[image, branch, slot] = torch.stack(probs)[..., : self.n_image].permute(1, 3, 0, 2, 4)
        return d.output(h)

    def reorder(self, parents):
        for c in self.cache:
            c.reorder(parents)


def check_positions(decoder, n: int):
    """One clear line, before any step, if n positions exceed the decoder's rotary table."""
    if n > decoder.rope_cos.shape[0]:
        raise ValueError(
            f"sampling needs {n} positions, beyond what this decoder supports ({decoder.rope_cos.shape[0]} = 2 x "
            "max_seq_len); raise language.max_seq_len in the config or sample fewer tokens"
        )


class StaticSampler:
    """Fixed-shape decode steps for `sampling.one_shot_fixed`: every step feeds all k branches of every
    image, finished ones too (their outputs are ignored), into a cache preallocated for T steps.

    `step(newest [B, k], t)` returns logits [B, k, V]. The step number lives in a device tensor and
    positions, columns and the mask are computed from it on the device, so a step reads nothing back
    to the host: `torch.compile(fullgraph=True)` traces it whole, and on CUDA it is captured once as a
    CUDA graph and replayed (`capture`), as gpt-fast does for its decode step.
    """

    def __init__(self, decoder, B: int, L: int, k: int, T: int, device, dtype):
        c = decoder.config
        check_positions(decoder, L + T)
        self.decoder, self.shape, self.L, self.k, self.T = decoder, (B, L, k, T, device, dtype), L, k, T
        self.cache = [KVCache(B, L, k, T, c.n_heads, c.head_dim, device, dtype) for _ in decoder.layers]
        self.branch = torch.arange(k, device=device).expand(B, k)
        self.t = torch.ones((), dtype=torch.long, device=device)
        self.newest = torch.zeros(B, k, dtype=torch.long, device=device)
        self.run, self.graph = self.forward, None

    @torch.inference_mode()
    def prefill(self, x, prefix_mask):
        """Run the prefix embeddings x [B, L, D] into the cache (in place, so a captured step stays valid)
        and keep the first-step logits [B, V] in `first`."""
        h, _ = self.decoder.blocks(x, torch.arange(self.L, device=x.device), prefix_mask, self.cache)
        self.first = self.decoder.output(h[:, -1])
        return self

    def forward(self, newest, t):
        """The step itself, from device tensors only: newest [B, k] ids, t [] the tokens each branch holds."""
        d, L, T = self.decoder, self.L, self.T
        positions = (L + t - 1).expand(self.k)
        columns = L + self.branch * T + (t - 1)  # [B, k]
        mask = step_mask(self.branch, t, L, self.k, T)
        h, _ = d.blocks(d.tok_embeddings(newest), positions, mask, self.cache, columns)
        return d.output(h)

    def compile(self, **options):
        """Run the step through `torch.compile(..., fullgraph=True)` (fails loudly on a host read)."""
        self.run = torch.compile(self.forward, fullgraph=True, **options)
        return self

    @torch.inference_mode()
    def capture(self):
        """Record the step as one CUDA graph over fixed input buffers; `step` then replays it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as torch.cuda.graph requires;
            self.forward(self.newest, self.t)  # it writes slot 0, which step 1 writes again
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward(self.newest, self.t)
        return self

    @torch.inference_mode()
    def step(self, newest, t: int):
        self.newest.copy_(newest)
        self.t.fill_(t)
        if self.graph is None:
            return self.run(self.newest, self.t)
        self.graph.replay()
        return self.logits
