"""K2-Thinking's chat format: messages -> prompt text, and -> token ids with a training mask.

`render` writes exactly what the official K2-Thinking template writes when transformers renders it
(tests/data/chat_conformance.json holds the expected bytes), without Jinja, so the engine and the
trainer share one reading of the format. `render_ids` gives the ids the model sees and produces, with
a mask over what the assistant generated. Parsing the model's output back into a message lives in
nanok2/chat_parse.py and is re-exported here (`StreamParser`, `parse`).

The format, in short:
    [<|im_system|>tool_declare<|im_middle|>{tools JSON}<|im_end|>]
    [<|im_system|>system<|im_middle|>{default system prompt}<|im_end|>]   if messages[0] is not system
    <|im_user|>{name or "user"}<|im_middle|>{content}<|im_end|>
    <|im_assistant|>{name or "assistant"}<|im_middle|><think>{reasoning}</think>{content}
        [<|tool_calls_section_begin|>(<|tool_call_begin|>{id}<|tool_call_argument_begin|>{args}<|tool_call_end|>)*
         <|tool_calls_section_end|>]<|im_end|>
    <|im_system|>{name or "tool"}<|im_middle|>## Return of {tool_call_id}\n{content}<|im_end|>
Reasoning is written only for the assistant messages after the last one without tool calls (the
current tool loop); earlier ones get an empty `<think></think>`.
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import NamedTuple

from nanok2.chat_parse import StreamParser, parse  # noqa: F401  (re-exported: nanok2.chat is the entry point)
from nanok2.errors import NanoK2Error

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

# transformers fills `reasoning_content` from these older names before rendering (first non-null wins);
# the template reads only `reasoning_content`.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# What the template writes for an image part. `<|media_start|>` is not a K2 special token (K2 has
# `<|media_begin|>`), so it stays ordinary text while the three others are special tokens.
_IMAGE_PIECES = (("<|media_start|>image", False), ("<|media_content|>", True), ("<|media_pad|>", True),
                 ("<|media_end|>", True), ("\n", False))


class Piece(NamedTuple):
    """A stretch of rendered text: a special token (`special`) or ordinary text, whether the assistant
    generated it (`trained`), and whether it is a tool's result (`tool_result`: its header and content)."""
    text: str
    special: bool
    trained: bool = False
    tool_result: bool = False


_MISSING = object()  # a key the message does not have (Jinja's Undefined)


def _jinja_text(value) -> str:
    # Jinja prints a missing key as "" and anything else with str(): None -> "None", True -> "True".
    return "" if value is _MISSING else str(value)


def _content_pieces(message: dict, trained: bool) -> list[Piece]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [Piece(content, False, trained)]
    if not isinstance(content, (list, tuple)):
        raise NanoK2Error(f"message content must be a string, a list of parts or null, got {type(content).__name__}")
    pieces = []
    for part in content:
        if not isinstance(part, dict):
            raise NanoK2Error(f"content part must be a dict like {{'type': 'text', 'text': ...}}, got {part!r}")
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            pieces += [Piece(text, special, trained) for text, special in _IMAGE_PIECES]
        else:
            pieces.append(Piece(_jinja_text(part.get("text", _MISSING)), False, trained))
    return pieces


def _header(message: dict) -> list[Piece]:
    if "role" not in message:
        raise NanoK2Error(f"message without a 'role': {message!r}")
    role = message["role"]
    opener = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
    return [Piece(opener, True), Piece(_jinja_text(message.get("name") or role), False), Piece("<|im_middle|>", True)]


def _tool_call_pieces(message: dict, trained: bool) -> list[Piece]:
    pieces = [Piece("<|tool_calls_section_begin|>", True, trained)]
    for call in message["tool_calls"]:
        try:
            arguments = call["function"]["arguments"]
        except (KeyError, TypeError):
            raise NanoK2Error(f"tool call without function.arguments: {call!r}") from None
        if not isinstance(arguments, str):
            # transformers' `tojson`: non-ASCII kept, keys in the caller's order, ", " and ": " separators.
            arguments = json.dumps(arguments, ensure_ascii=False)
        pieces += [Piece("<|tool_call_begin|>", True, trained),
                   Piece(_jinja_text(call.get("id", _MISSING)), False, trained),
                   Piece("<|tool_call_argument_begin|>", True, trained), Piece(arguments, False, trained),
                   Piece("<|tool_call_end|>", True, trained)]
    return pieces + [Piece("<|tool_calls_section_end|>", True, trained)]


def _message_pieces(message: dict, keep_reasoning: bool) -> list[Piece]:
    pieces = _header(message)
    role = message["role"]
    if role == "assistant":
        # Only assistant messages whose reasoning is kept are rendered as they were generated, so only
        # they are trained on; history turns lost their reasoning and would teach an empty <think>.
        trained = keep_reasoning
        reasoning = _jinja_text(message.get("reasoning_content", "")) if keep_reasoning else ""
        pieces += [Piece("<think>", True, trained), Piece(reasoning, False, trained), Piece("</think>", True, trained)]
        pieces += _content_pieces(message, trained)
        if message.get("tool_calls"):
            pieces += _tool_call_pieces(message, trained)
        return pieces + [Piece("<|im_end|>", True, trained)]
    if role == "tool":
        pieces.append(Piece(f"## Return of {_jinja_text(message.get('tool_call_id', _MISSING))}\n", False,
                            tool_result=True))
        return pieces + [p._replace(tool_result=True) for p in _content_pieces(message, False)] + \
            [Piece("<|im_end|>", True)]
    return pieces + _content_pieces(message, False) + [Piece("<|im_end|>", True)]


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    return message if reasoning is None else {**message, "reasoning_content": reasoning}


def _last_final_answer(messages: list[dict]) -> int:
    """Index of the last assistant message without tool calls, or -1."""
    return next((i for i in range(len(messages) - 1, -1, -1)
                 if messages[i].get("role") == "assistant" and not messages[i].get("tool_calls")), -1)


def render_pieces(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, keep_reasoning_after: int | None = None
                  ) -> list[Piece]:
    """The rendering as pieces; `render` joins them, `render_ids` encodes them.

    Reasoning is kept for messages after index `keep_reasoning_after` (default: the template's own
    choice, the last assistant message without tool calls).
    """
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise NanoK2Error("messages must be a list of dicts with at least a 'role'")
    messages = [_alias_reasoning(m) for m in messages]
    split = _last_final_answer(messages) if keep_reasoning_after is None else keep_reasoning_after
    pieces: list[Piece] = []
    if tools:
        pieces += [Piece("<|im_system|>", True), Piece("tool_declare", False), Piece("<|im_middle|>", True),
                   Piece(json.dumps(tools, ensure_ascii=False), False), Piece("<|im_end|>", True)]
    if system_prompt is not None and (not messages or messages[0].get("role") != "system"):
        pieces += [Piece("<|im_system|>", True), Piece("system", False), Piece("<|im_middle|>", True),
                   Piece(system_prompt, False), Piece("<|im_end|>", True)]
    for i, message in enumerate(messages):
        pieces += _message_pieces(message, keep_reasoning=i > split)
    if add_generation_prompt:
        pieces += [Piece("<|im_assistant|>", True), Piece("assistant", False), Piece("<|im_middle|>", True)]
    return pieces


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
           system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """Messages (OpenAI style) -> the prompt text, byte for byte what the official template writes.

    `system_prompt` is inserted when the conversation does not open with a system message (the
    template's own default is K2's); None inserts nothing.
    """
    return "".join(p.text for p in render_pieces(messages, tools, add_generation_prompt, system_prompt))


def render_ids(messages: list[dict], tokenizer, tools: list[dict] | None = None, add_generation_prompt: bool = False,
               system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, assistant: int = 1,
               tool_results: int = 0) -> tuple[list[int], list[int]]:
    """Messages -> (ids, loss_mask) for supervised fine-tuning; mask `assistant` (1) on what the assistant
    generated, `tool_results` (0) on the tools' results, from their `## Return of` header to their end.

    The ids are those the model saw and produced: when the conversation ends with a final answer (an
    assistant message without tool calls), that answer and the tool loop before it keep their reasoning
    (the template would drop it, as it does once a turn is over), so every trained assistant message
    follows exactly `render(messages[:i], add_generation_prompt=True)`. The mask is 1 on those messages
    from `<think>` to their `<|im_end|>` inclusive and 0 elsewhere: on prompts, tool results, headers,
    and on earlier turns, whose reasoning is gone. Train on every turn by making one example per turn.

    Special tokens come only from the format: text inside messages is encoded as ordinary text even when
    it spells `<|im_end|>`. Otherwise the ids equal `tokenizer.encode(text, allowed_special="all")`.
    """
    split = None
    last = messages[-1] if messages else None
    if not add_generation_prompt and isinstance(last, dict) and last.get("role") == "assistant" \
            and not last.get("tool_calls"):
        split = _last_final_answer(messages[:-1])
    pieces = render_pieces(messages, tools, add_generation_prompt, system_prompt, keep_reasoning_after=split)
    ids: list[int] = []
    mask: list[int] = []
    text, text_mask = "", 0
    # Adjacent ordinary pieces are encoded together (BPE merges across them, as on the joined text);
    # every trained stretch (and every tool result) starts and ends at a special token, so no stretch
    # mixes mask values.
    for piece in [*pieces, Piece("", True)]:
        value = assistant if piece.trained else tool_results if piece.tool_result else 0
        if not piece.special:
            text, text_mask = text + piece.text, value
            continue
        if text:
            chunk = tokenizer.encode(text)
            ids += chunk
            mask += [text_mask] * len(chunk)
            text = ""
        if piece.text:
            ids.append(tokenizer.id_of(piece.text))
            mask.append(value)
    return ids, mask


@cache
def own_chat_template() -> str:
    """nanok2's own Jinja chat template (nanok2/templates/chat_template.jinja), written into the
    `tokenizer_config.json` of exported checkpoints; it renders like `render`."""
    return resources.files("nanok2").joinpath("templates/chat_template.jinja").read_text(encoding="utf-8")
