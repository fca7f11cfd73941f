"""Context management for long tool loops: what the model sees once old tool outputs are hidden.

K2 Thinking runs up to 300 steps of search and reading; when tool outputs overflow its context, it
hides all previous tool outputs and goes on. The agent loop applies the same rule while running, and
the trainer needs the same views to train on, so both use these pure functions: the messages are
OpenAI-style dicts and are never modified in place.
"""
from __future__ import annotations

import json

PLACEHOLDER = "[tool output hidden to save context]"


def hide_old_tool_outputs(messages: list[dict], keep_last: int = 0, before: int | None = None,
                          placeholder: str = PLACEHOLDER) -> list[dict]:
    """A copy of `messages` in which the outputs of tool calls made before position `before` (default:
    the end) are replaced by `placeholder`, except those of the last `keep_last` tool-calling turns."""
    before = len(messages) if before is None else before
    turns = [i for i, m in enumerate(messages[:before]) if m.get("role") == "assistant" and m.get("tool_calls")]
    # outputs after this position answer the kept turns (or come after `before`) and stay
    cut = turns[-keep_last] if 0 < keep_last <= len(turns) else (0 if keep_last else before)
    return [{**m, "content": placeholder} if m.get("role") == "tool" and i < cut else dict(m)
            for i, m in enumerate(messages)]


def context_chars(messages: list[dict]) -> int:
    """A tokenizer-free measure of context size: the characters of contents, reasoning and tool calls."""
    return sum(len(m.get("content") or "") + len(m.get("reasoning_content") or "")
               + len(json.dumps(m.get("tool_calls") or [])) for m in messages)


def overflow_views(messages: list[dict], max_chars: int, keep_last: int = 0) -> list[tuple[list[dict], int]]:
    """The contexts a run really sees under K2's rule, as (view, train_from) pairs.

    Before each assistant turn, if the context seen so far is longer than `max_chars` and hiding would
    shrink it, every earlier tool output (but those of the last `keep_last` turns) is hidden, and the
    run goes on from there. Each pair is the conversation up to the next hiding (or the end) as seen
    during that stretch; the assistant turns from `train_from` on were produced with exactly that view,
    so a trainer learns those and masks the rest. Without overflow there is one view: the conversation.
    """
    views, start, cut = [], 0, 0  # outputs before `cut` are hidden in the current stretch
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or i == start:
            continue
        seen = context_chars(hide_old_tool_outputs(messages[:i], keep_last, before=cut))
        if seen > max_chars and context_chars(hide_old_tool_outputs(messages[:i], keep_last, before=i)) < seen:
            views.append((hide_old_tool_outputs(messages[:i], keep_last, before=cut), start))
            start = cut = i
    views.append((hide_old_tool_outputs(messages, keep_last, before=cut), start))
    return views
