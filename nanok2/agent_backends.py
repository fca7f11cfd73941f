"""Where the agent's model runs: nanok2's own Engine, or any OpenAI-compatible chat-completions server.

The loop (nanok2/agent.py) needs three things from a model, whatever runs it:

    complete(messages, tools, tool_choice="auto", on_event=None) -> dict
        the assistant message (role, content, reasoning_content, tool_calls, parser `errors` if any)
        plus `finish_reason` and `usage` {prompt_tokens, completion_tokens, cached_tokens};
    count_tokens(messages, tools) -> int      the prompt's length, to keep it inside the context;
    context_tokens, max_tokens                the context (None: unknown) and the reply's limit.

Sampling settings belong to the backend (an Engine takes SamplingParams, a server takes request
fields), so the loop never imports torch. The OpenAI backend is how the same loop will drive the real
K2-Thinking on vLLM or Moonshot's API: it sends `reasoning_content` back in assistant messages (K2 and
Moonshot's API need it within a tool loop) and echoes tool-call ids exactly as the server wrote them.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Callable, Protocol

from nanok2.chat import render, render_ids

if TYPE_CHECKING:
    from nanok2.engine import Engine
    from nanok2.sampling import SamplingParams


class Backend(Protocol):
    name: str
    context_tokens: int | None
    max_tokens: int

    def complete(self, messages: list[dict], tools: list[dict] | None, tool_choice: str = "auto",
                 on_event: Callable | None = None) -> dict: ...

    def count_tokens(self, messages: list[dict], tools: list[dict] | None) -> int: ...


def prompt_tokens(messages: list[dict], tokenizer, tools: list[dict] | None) -> int:
    """The length of the prompt the engine is given for `messages`: rendered with the generation prompt.
    The agent loop fits its context with this count, and agent-model training data (agent_data.py) must
    be cut with the same one."""
    ids, _ = render_ids(messages, tokenizer, tools, add_generation_prompt=True)
    return len(ids)


def reply_tokens(messages: list[dict], tokenizer, tools: list[dict] | None) -> int:
    """The tokens the model generates for the assistant message that ends `messages`, `<think>` to
    `<|im_end|>`: what one reply's max_tokens must hold. (A prompt count of `messages` would not do for a
    final answer: the template drops the reasoning of a finished turn.)"""
    ids, _ = render_ids(messages, tokenizer, tools)
    return len(ids) - prompt_tokens(messages[:-1], tokenizer, tools)


class EngineBackend:
    """nanok2's Engine: the K2 chat format rendered to ids, generated, parsed while streaming.

    `tool_choice="none"` keeps the tools in the prompt (its prefix stays cached, and the model sees what
    it always saw); the loop simply does not run calls made then.
    """

    def __init__(self, engine: "Engine", params: "SamplingParams | None" = None, name: str = "engine"):
        from nanok2.sampling import SamplingParams

        self.engine = engine
        self.params = params or SamplingParams(temperature=1.0, max_tokens=1024)  # K2's recommended temperature
        self.name = name
        self.context_tokens = engine.max_seq

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    def count_tokens(self, messages: list[dict], tools: list[dict] | None) -> int:
        return prompt_tokens(messages, self.engine.tokenizer, tools)

    def complete(self, messages: list[dict], tools: list[dict] | None, tool_choice: str = "auto",
                 on_event: Callable | None = None) -> dict:
        return self.engine.chat(messages, tools, self.params, on_event=on_event)


# ---- OpenAI-compatible servers ---------------------------------------------------------------------

_API_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """The loop's messages as a chat-completions request wants them: only API fields, reasoning sent
    back as `reasoning_content` (newer vLLM's `reasoning` accepted as its source), tool-call arguments
    as JSON text, ids untouched."""
    out = []
    for m in messages:
        msg = {k: m[k] for k in _API_KEYS if k in m}
        if m.get("role") == "assistant":
            reasoning = next((m[k] for k in ("reasoning_content", "reasoning") if m.get(k)), None)
            if reasoning:
                msg["reasoning_content"] = reasoning
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["function"]["name"],
                                  "arguments": a if isinstance(a := c["function"]["arguments"], str)
                                  else json.dumps(a, ensure_ascii=False)}}
                    for c in m["tool_calls"]]
            else:
                msg.pop("tool_calls", None)  # an empty list is refused by some servers
        out.append(msg)
    return out


def openai_request(model: str, messages: list[dict], tools: list[dict] | None, params=None,
                   tool_choice: str = "auto") -> dict:
    """Keyword arguments for `client.chat.completions.create`. `params` is a SamplingParams (or None for
    the server's defaults); top_k and min_p are not OpenAI fields and go in `extra_body`, where vLLM and
    SGLang read them."""
    request: dict = {"model": model, "messages": to_openai_messages(messages)}
    if tools:
        request["tools"] = tools
        request["tool_choice"] = tool_choice
    if params is not None:
        request.update(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens)
        if params.seed is not None:
            request["seed"] = params.seed
        if params.stop:
            request["stop"] = list(params.stop)
        extra = {k: v for k, v in (("top_k", params.top_k), ("min_p", params.min_p)) if v}
        if extra:
            request["extra_body"] = extra
    return request


def from_openai(response: dict) -> dict:
    """A chat-completions response (as a dict) -> the loop's reply: the message with `reasoning_content`
    (from `reasoning_content` or `reasoning`), tool calls with their ids as sent, `finish_reason`, `usage`."""
    choice = response["choices"][0]
    m = choice.get("message") or {}
    reply = {"role": "assistant", "content": m.get("content"),
             "reasoning_content": m.get("reasoning_content") or m.get("reasoning") or ""}
    if m.get("tool_calls"):
        reply["tool_calls"] = [{"id": c.get("id") or "", "type": "function",
                                "function": {"name": (c.get("function") or {}).get("name") or "",
                                             "arguments": (c.get("function") or {}).get("arguments") or ""}}
                               for c in m["tool_calls"]]
    usage = response.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reply["finish_reason"] = choice.get("finish_reason")
    reply["usage"] = {"prompt_tokens": usage.get("prompt_tokens") or 0,
                      "completion_tokens": usage.get("completion_tokens") or 0, "cached_tokens": cached}
    return reply


class OpenAIBackend:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint, through the official `openai` client.

    The server's tokenizer is not here, so prompts are measured as the K2 rendering's characters / 3
    (an overestimate for English text, so the context is not overrun); give `context_tokens` to have
    the loop manage the context, or leave None to let the server refuse what is too long.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, params: "SamplingParams | None" = None,
                 context_tokens: int | None = None, timeout_s: float = 600.0):
        import openai

        # local servers (vLLM, SGLang, nanok2's own) take any key; the client insists on one
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s)
        self.model = model
        self.params = params
        self.name = f"openai:{model}@{base_url}"
        self.context_tokens = context_tokens

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens if self.params is not None else 0

    def count_tokens(self, messages: list[dict], tools: list[dict] | None) -> int:
        return len(render(messages, tools, add_generation_prompt=True)) // 3

    def complete(self, messages: list[dict], tools: list[dict] | None, tool_choice: str = "auto",
                 on_event: Callable | None = None) -> dict:
        response = self.client.chat.completions.create(**openai_request(self.model, messages, tools, self.params,
                                                                        tool_choice))
        return from_openai(response.model_dump())
