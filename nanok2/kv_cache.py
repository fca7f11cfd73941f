"""The preallocated latent KV cache: what MLA keeps per token, which slot holds which request, and prefix reuse.

MLA caches per token and layer only the normed latent c_kv (kv_lora_rank numbers) and the shared rope
key k_rope (qk_rope_head_dim numbers): 576 numbers for K2 instead of 2·64·192 for plain multi-head
attention. The cache is allocated once, for `max_batch` slots of `max_seq` tokens, and written in place.

Each slot remembers the token ids whose latents it holds, also after its request has finished. A new
request whose prompt starts with tokens some slot already holds (an agent re-sending its conversation
with one more tool result) reuses them: only the rest is prefilled. When the best match sits in a slot
that is busy, its rows are copied into the free slot (a few kB per token), as when several trajectories
share one long prompt.
"""
from __future__ import annotations

import psutil
import torch

from nanok2.errors import NanoK2Error


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LatentCache:
    """c_kv [L, S, T, r] and k_rope [L, S, T, dr] for S = max_batch slots of T = max_seq tokens."""

    def __init__(self, n_layers: int, max_batch: int, max_seq: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        if max_batch < 1 or max_seq < 2:
            raise NanoK2Error(f"the cache needs max_batch >= 1 and max_seq >= 2, got {max_batch} and {max_seq}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = n_layers * (kv_lora_rank + rope_dim) * itemsize
        total = self.bytes_per_token * max_batch * max_seq
        available = psutil.virtual_memory().available
        if str(device) == "cpu" and total > 0.8 * available:
            raise NanoK2Error(f"a KV cache of {max_batch} slots x {max_seq} tokens needs {total / 2**30:.2f} GiB "
                              f"({self.bytes_per_token} bytes per token), more than the {available / 2**30:.2f} GiB "
                              "available: lower max_batch or max_seq")
        self.c_kv = torch.zeros(n_layers, max_batch, max_seq, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(n_layers, max_batch, max_seq, rope_dim, dtype=dtype, device=device)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.tokens: list[list[int]] = [[] for _ in range(max_batch)]   # ids whose latents each slot holds
        self.free: list[int] = list(range(max_batch))                     # least recently released first

    @property
    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_rope.nbytes

    def acquire(self, prompt: list[int]) -> tuple[int, int]:
        """Take a free slot for `prompt`; -> (slot, number of prompt tokens already cached there).

        At least the last prompt token is always recomputed: its logits choose the first new token.
        """
        if not self.free:
            raise RuntimeError("no free slot")   # the engine checks first: a bug, not bad input
        limit = len(prompt) - 1
        matches = [min(common_prefix(t, prompt), limit) for t in self.tokens]
        best = max(range(self.max_batch), key=lambda s: matches[s])
        free_best = max(self.free, key=lambda s: matches[s])      # ties: the least recently released
        slot, reused = free_best, matches[free_best]
        if matches[best] > reused:                                 # a busy slot holds more: copy its rows
            reused = matches[best]
            self.c_kv[:, slot, :reused] = self.c_kv[:, best, :reused]
            self.k_rope[:, slot, :reused] = self.k_rope[:, best, :reused]
        self.free.remove(slot)
        self.tokens[slot] = list(prompt[:reused])
        return slot, reused

    def release(self, slot: int) -> None:
        """The slot's request is over; its latents stay for prefix reuse until the slot is taken again."""
        self.free.append(slot)
