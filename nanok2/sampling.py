"""Choosing the next token: the per-request parameters and the sampling maths as pure functions.

The engine calls `next_token(logits, params, generator)` once per request and step, each request with
its own `torch.Generator` seeded from `params.seed`, so a seeded request samples the same tokens
whatever else shares its batch. The filters work on one row of logits [V] in fp32 and return logits with
the removed tokens at -inf, in the order vLLM applies them: temperature, top-k, top-p, then min-p.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanok2.errors import NanoK2Error


@dataclass
class SamplingParams:
    """What one request asks of the sampler and of the stopping rules (OpenAI's names where they exist)."""
    temperature: float = 1.0          # 0: greedy (argmax); K2-Thinking recommends 1.0
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off; keep tokens with p >= min_p * p_max
    seed: int | None = None           # None: a fresh random generator
    max_tokens: int = 256             # generated tokens, the forced `</think>` included
    stop_token_ids: list[int] | None = None   # None: the model's end of turn (eos, `<|im_end|>`)
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first match
    thinking_budget: int | None = None  # reasoning tokens before `</think>` is forced; None: unlimited

    def validate(self) -> None:
        """Raise NanoK2Error naming the parameter that is out of range."""
        def need(cond: bool, msg: str):
            if not cond:
                raise NanoK2Error(f"invalid sampling parameters: {msg}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an int >= 0, got {self.top_k!r}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        need(self.thinking_budget is None or self.thinking_budget >= 0,
             f"thinking_budget must be None or >= 0, got {self.thinking_budget}")
        need(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits [V] (ties at the k-th value are kept); k = 0 or >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the most likely always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the tokens before it already reach p
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the largest one's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> fp32 logits after temperature, top-k, top-p and min-p (temperature > 0)."""
    x = apply_temperature(logits.float(), params.temperature)
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One row of logits [V] -> the next token id: argmax at temperature 0, else a draw from the filtered softmax."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = filtered_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when asked, else from fresh entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
