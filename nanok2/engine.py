"""The inference engine: token ids in, streamed tokens out, many requests at once over one latent KV cache.

A thinking agent re-sends a growing conversation at every tool step and writes long reasoning, so the
engine keeps three things cheap: the cache (MLA's latent, kv_cache.py), the decode step (absorbed
attention on that latent, one batched forward for every running request), and repeated prefixes
(only the tokens a slot does not already hold are prefilled; `usage.cached_tokens` says how many were reused).

Two ways in:
- `generate(prompt_ids, params)` / `chat(messages, tools, params)` for one caller;
- `add_request(prompt_ids, params) -> id` then `step() -> events` until `has_work()` is false, for a
  server with many clients. Requests wait in a queue until a slot is free and join the running batch
  between decode steps; finished ones leave it and free their slot.

Attention at decode runs in the *absorbed* form (DeepSeek-V3's `absorb`): `kv_b_proj`'s key rows are folded
into the query and its value rows into the output, so nothing is expanded per head. Prefill uses the
model's naive `MLA.attend` on the cached latent, the reference the absorbed form is tested against.
With `cpu_kernels=True` a decode step is one C++ call (nanok2.fused_decode: the same maths, without
≈70 small torch ops per layer); the eager `_decode` below stays as its reference.
"""
from __future__ import annotations

import codecs
import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from nanok2.errors import NanoK2Error
from nanok2.kv_cache import LatentCache
from nanok2.sampling import SamplingParams, make_generator, next_token

PREFILL_CHUNK = 512   # prompt tokens per prefill forward: bounds the attention scores of long prompts


def absorbed_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                       kv_b_weight: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence against its cached latents, without expanding keys or values.

    q_nope [B, H, dn], q_rope [B, H, dr] (rotated), c_kv [B, T, r], k_rope [B, T, dr], kv_b_weight
    [H·(dn+dv), r] (`kv_b_proj.weight`), lengths [B]: cached tokens each query sees. -> [B, H·dv].

    scores = (q_nope·W_uk)·c_kvᵀ + q_rope·k_ropeᵀ, out = (softmax·c_kv)·W_uvᵀ, all in fp32: bf16 batched
    matmuls are slow on CPUs without bf16 units, and widening kv_b_proj each step costs little next to the
    step's other weights (for K2, kv_b_proj is 1.5% of the weights a token reads).
    """
    B, H, dn = q_nope.shape
    T, r = c_kv.shape[1], c_kv.shape[2]
    w = kv_b_weight.float().view(H, -1, r)
    w_uk, w_uv = w[:, :dn], w[:, dn:]                                   # [H, dn, r], [H, dv, r]
    c = c_kv.float()
    q_latent = torch.bmm(q_nope.float().transpose(0, 1), w_uk).transpose(0, 1)           # [B, H, r]
    scores = torch.baddbmm(q_rope.float() @ k_rope.float().transpose(1, 2), q_latent, c.transpose(1, 2))  # [B, H, T]
    past = torch.arange(T, device=c.device) >= lengths[:, None, None]
    probs = (scores * scale).masked_fill_(past, float("-inf")).softmax(-1)
    out = torch.bmm((probs @ c).transpose(0, 1), w_uv.transpose(1, 2))                   # [H, B, dv]
    return out.transpose(0, 1).reshape(B, -1).to(q_nope.dtype)


@dataclass
class Event:
    """One streamed step of one request: the token it produced and its text (may be empty while a UTF-8
    character or a possible stop string is incomplete). The last event of a request has `finish_reason`
    ("stop", "length" or "cancelled") and `usage` (prompt_tokens, completion_tokens, total_tokens, cached_tokens)."""
    request: int
    token: int | None = None
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    generator: torch.Generator
    slot: int = -1
    pos: int = 0                   # tokens of this request in its cache slot
    cached: int = 0                # prompt tokens reused from the cache
    next: int = -1                 # last produced token, to be fed at `pos` by the next decode step
    generated: list[int] = dataclasses.field(default_factory=list)
    thinking: bool = True          # before `</think>`: reasoning tokens count against the thinking budget
    think_tokens: int = 0
    text: str = ""                 # generated text so far (cut at a stop string)
    sent: int = 0                  # characters of `text` already streamed
    decoder: codecs.IncrementalDecoder | None = None


class Engine:
    """Continuous batching over a preallocated latent cache. Not thread-safe: one caller drives `step()`."""

    def __init__(self, model, tokenizer=None, max_batch: int = 8, max_seq: int = 4096, cpu_kernels: bool = False):
        """`cpu_kernels`: run decode steps through nanok2's compiled CPU kernels: the whole step as one C++ call
        (nanok2.fused_decode) and, on a bf16 model, its linear layers and experts through nanok2.cpu_kernels
        for prefill (the modules' classes are swapped in place, weights shared), with the weights moved into
        huge pages (nanok2.huge_pages). Several times faster on a CPU. Off by default: the kernels are compiled
        on first use (a minute or two, then cached), and the eager step is the reference the tests compare
        them with."""
        args = model.args
        if max_seq > args.max_position_embeddings:
            raise NanoK2Error(f"max_seq={max_seq} exceeds the model's max_position_embeddings={args.max_position_embeddings}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = args
        weight = model.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.fused = None
        if cpu_kernels and self.device.type == "cpu":
            from nanok2.cpu_kernels import use_bf16_kernel
            from nanok2.fused_decode import FusedDecoder
            from nanok2.huge_pages import move_to_huge_pages
            move_to_huge_pages(model)
            if self.dtype == torch.bfloat16:
                use_bf16_kernel(model)
            self.fused = FusedDecoder.build(model)
        self.cache = LatentCache(args.num_hidden_layers, max_batch, max_seq, args.kv_lora_rank,
                                 args.qk_rope_head_dim, self.dtype, self.device)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._next_id = 0
        # prefill totals: decode is timed per step by its caller, prefill happens inside step()
        self.stats = dict(prefill_tokens=0, prefill_s=0.0)
        self.default_stop_ids = {args.eos_token_id} - {None}
        self.think_begin: int | None = None
        self.think_end: int | None = None
        if tokenizer is not None:
            self.default_stop_ids.add(tokenizer.id_of("<|im_end|>"))
            self.think_begin, self.think_end = tokenizer.id_of("<think>"), tokenizer.id_of("</think>")

    # ---------------------------------------------------------------- requests

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise NanoK2Error when this request can never run; a bad request never reaches the batch."""
        params.validate()
        if not prompt_ids:
            raise NanoK2Error("the prompt is empty: give at least one token id")
        if len(prompt_ids) > self.max_seq:
            raise NanoK2Error(f"the prompt has {len(prompt_ids)} tokens, more than max_seq={self.max_seq} "
                              "that each cache slot holds: shorten it or build the Engine with a larger max_seq")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.args.vocab_size)]
        if bad:
            raise NanoK2Error(f"token id(s) {bad[:5]} outside the vocabulary 0..{self.args.vocab_size - 1}")
        if params.stop and self.tokenizer is None:
            raise NanoK2Error("stop strings need a tokenizer: build the Engine with one, or use stop_token_ids")
        if params.thinking_budget is not None and self.think_end is None:
            raise NanoK2Error("a thinking budget needs a tokenizer that knows </think>")

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; -> its id, which its events carry. It joins the batch at a coming `step()`."""
        params = params or SamplingParams()
        self.check(prompt_ids, params)
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else set(params.stop_token_ids)
        req = _Request(self._next_id, list(prompt_ids), params, stop_ids, make_generator(params.seed))
        if self.tokenizer is not None:
            req.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> list[Event]:
        """Drop a waiting or running request (a client went away); -> its final event, if it was there."""
        for req in list(self.waiting) + self.running:
            if req.id == request_id:
                if req in self.waiting:
                    self.waiting.remove(req)
                return [self._finish(req, "cancelled", None)]
        return []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Event]:
        """Admit waiting requests into free slots (prefill), then one decode step for the whole batch."""
        events: list[Event] = []
        while self.waiting and self.cache.free:
            req = self.waiting.popleft()
            req.slot, req.cached = self.cache.acquire(req.prompt)
            t = time.perf_counter()
            logits = self._prefill(req.slot, req.prompt[req.cached:], req.cached)
            self.stats["prefill_s"] += time.perf_counter() - t
            self.stats["prefill_tokens"] += len(req.prompt) - req.cached
            self.cache.tokens[req.slot] = list(req.prompt)
            req.pos = len(req.prompt)
            self.running.append(req)
            self._accept(req, logits, events)
        if self.running:
            batch = sorted(self.running, key=lambda r: r.slot)    # contiguous slots read the cache without a copy
            logits = self._decode([r.slot for r in batch], [r.next for r in batch], [r.pos for r in batch])
            for req, row in zip(batch, logits):
                self.cache.tokens[req.slot].append(req.next)
                req.pos += 1
                self._accept(req, row, events)
        return events

    def _accept(self, req: _Request, logits: torch.Tensor, events: list[Event]) -> None:
        """Choose the request's next token from its logits [V], stream it, and finish the request if it is done."""
        p = req.params
        if req.thinking and p.thinking_budget is not None and req.think_tokens >= p.thinking_budget:
            token = self.think_end                       # the budget is spent: close the reasoning
        else:
            token = next_token(logits, p, req.generator)
        req.generated.append(token)
        req.next = token
        if req.thinking:
            if token == self.think_end:
                req.thinking = False
            elif token != self.think_begin:
                req.think_tokens += 1
        reason = None
        if token in req.stop_ids:
            reason = "stop"
        elif req.decoder is not None:
            before = len(req.text)
            req.text += req.decoder.decode(self.tokenizer.decode_bytes([token]))
            for s in p.stop:
                at = req.text.find(s, max(0, before - len(s) + 1))
                if at != -1:
                    req.text, reason = req.text[:at], "stop"
        if reason is None and (len(req.generated) >= p.max_tokens or req.pos >= self.max_seq):
            reason = "length"
        if reason is not None:
            events.append(self._finish(req, reason, token))
            return
        hold = max((len(s) - 1 for s in p.stop), default=0)   # a stop string may still be completing
        end = max(req.sent, len(req.text) - hold)
        events.append(Event(req.id, token, req.text[req.sent:end]))
        req.sent = end

    def _finish(self, req: _Request, reason: str, token: int | None) -> Event:
        if req.decoder is not None and reason != "stop":
            req.text += req.decoder.decode(b"", final=True)
        if req in self.running:
            self.running.remove(req)
            self.cache.release(req.slot)
        n = len(req.generated)
        usage = dict(prompt_tokens=len(req.prompt), completion_tokens=n, total_tokens=len(req.prompt) + n,
                     cached_tokens=req.cached)
        event = Event(req.id, token, req.text[req.sent:], reason, usage)
        req.sent = len(req.text)
        return event

    # ---------------------------------------------------------------- one-caller API

    def generate(self, prompt_ids: list[int] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[Event]:
        """Stream the events of one prompt or of a list of prompts run as one batch; `event.request` is
        the prompt's index. Every request is checked before any runs. Needs an idle engine."""
        single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
        prompts = [prompt_ids] if single or not prompt_ids else prompt_ids
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise NanoK2Error(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        if self.has_work():
            raise NanoK2Error("generate() needs an idle engine; with other requests in flight use add_request/step")
        for prompt, p in zip(prompts, params):
            self.check(prompt, p)
        index = {self.add_request(prompt, p): i for i, (prompt, p) in enumerate(zip(prompts, params))}
        try:
            while self.has_work():
                for ev in self.step():
                    yield dataclasses.replace(ev, request=index[ev.request])
        finally:   # the caller stopped early: free the slots
            for rid in list(index):
                self.cancel(rid)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, params: SamplingParams | None = None,
             on_event: Callable | None = None) -> dict:
        """Render the conversation with K2's chat format, generate, and parse the reply.

        -> the assistant message (`role`, `content`, `reasoning_content`, `tool_calls`, parser `errors`)
        plus `finish_reason` ("tool_calls" when it called tools) and `usage`. `on_event` receives the
        parser's streaming events (reasoning, content, tool-call pieces) as they are decoded.
        """
        from nanok2.chat import render_ids
        from nanok2.chat_parse import StreamParser

        if self.tokenizer is None:
            raise NanoK2Error("chat needs a tokenizer: build the Engine with one")
        prompt, _ = render_ids(messages, self.tokenizer, tools, add_generation_prompt=True)
        parser = StreamParser()
        last = None
        for ev in self.generate(prompt, params):
            for pe in parser.feed(ev.text):
                on_event and on_event(pe)
            last = ev
        for pe in parser.flush():
            on_event and on_event(pe)
        message = dict(parser.finish())
        reason = last.finish_reason
        if reason == "stop" and message.get("tool_calls"):
            reason = "tool_calls"
        return {**message, "finish_reason": reason, "usage": last.usage}

    # ---------------------------------------------------------------- forward passes over the cache

    @torch.inference_mode()
    def _prefill(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Run `ids` at positions start.. of a slot whose first `start` tokens are cached; -> logits [V] of the last."""
        model, cache = self.model, self.cache
        for c0 in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor(ids[c0:c0 + PREFILL_CHUNK], device=self.device)[None]   # [1, T]
            T, s0 = chunk.shape[1], start + c0
            cos, sin = model.rope(torch.arange(s0, s0 + T, device=self.device)[None])
            # queries see every cached token and the chunk's causal past; None = plain causal when nothing is cached
            mask = None if s0 == 0 else torch.ones(T, s0 + T, dtype=torch.bool, device=self.device).tril(s0)[None, None]
            x = model.model.embed_tokens(chunk)
            for i, layer in enumerate(model.model.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q_nope, q_rope = attn.queries(h, cos, sin)
                c_kv, k_rope = attn.latents(h, cos, sin)
                cache.c_kv[i, slot, s0:s0 + T] = c_kv[0]
                cache.k_rope[i, slot, s0:s0 + T] = k_rope[0]
                out = attn.attend(q_nope, q_rope, cache.c_kv[i, slot:slot + 1, :s0 + T],
                                  cache.k_rope[i, slot:slot + 1, :s0 + T], mask)
                x = x + attn.o_proj(out)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x[:, -1]))[0].float()

    @torch.inference_mode()
    def _decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per running request: token t_b at position p_b of slot s_b; -> logits [B, V] fp32."""
        model, cache = self.model, self.cache
        B = len(slots)
        pos = torch.tensor(positions, device=self.device)                            # [B]
        slot_idx = torch.tensor(slots, device=self.device)
        if self.fused is not None:
            return self.fused.step(torch.tensor(tokens), pos, slot_idx, cache.c_kv, cache.k_rope)
        ids = torch.tensor(tokens, device=self.device)[:, None]                     # [B, 1]
        contiguous = slots == list(range(slots[0], slots[0] + B))
        T = max(positions) + 1
        cos, sin = model.rope(pos[:, None])
        x = model.model.embed_tokens(ids)                                            # [B, 1, D]
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q_nope, q_rope = attn.queries(h, cos, sin)                               # [B, 1, H, dn], [B, 1, H, dr]
            c_kv, k_rope = attn.latents(h, cos, sin)                                 # [B, 1, r], [B, 1, dr]
            cache.c_kv[i, slot_idx, pos] = c_kv[:, 0]
            cache.k_rope[i, slot_idx, pos] = k_rope[:, 0]
            if contiguous:
                past_c = cache.c_kv[i, slots[0]:slots[0] + B, :T]                    # [B, T, r], a view
                past_r = cache.k_rope[i, slots[0]:slots[0] + B, :T]
            else:
                past_c, past_r = cache.c_kv[i, slot_idx, :T], cache.k_rope[i, slot_idx, :T]
            out = absorbed_attention(q_nope[:, 0], q_rope[:, 0], past_c, past_r, attn.kv_b_proj.weight,
                                     pos + 1, attn.softmax_scale)
            x = x + attn.o_proj(out)[:, None]
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x[:, 0])).float()
