"""Context views of long runs: old tool outputs hidden, as K2 Thinking does when its context overflows."""
from nanok2.context import PLACEHOLDER, context_chars, hide_old_tool_outputs, overflow_views


def conversation(steps: int, output_chars: int = 100) -> list[dict]:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    for i in range(steps):
        call = {"id": f"functions.open:{i}", "type": "function", "function": {"name": "open", "arguments": "{}"}}
        messages.append({"role": "assistant", "content": "", "reasoning_content": f"r{i}", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": str(i) * output_chars})
    messages.append({"role": "assistant", "content": "Exact Answer: x", "reasoning_content": "done"})
    return messages


def tool_contents(messages):
    return [m["content"] for m in messages if m["role"] == "tool"]


def test_hide_all_or_keep_last():
    messages = conversation(5)
    original = [dict(m) for m in messages]
    hidden = hide_old_tool_outputs(messages)
    assert tool_contents(hidden) == [PLACEHOLDER] * 5
    kept = hide_old_tool_outputs(messages, keep_last=2)
    assert tool_contents(kept) == [PLACEHOLDER] * 3 + ["3" * 100, "4" * 100]
    assert tool_contents(hide_old_tool_outputs(messages, keep_last=9)) == tool_contents(messages)
    assert messages == original  # pure: the input is untouched
    # everything but the tool contents is unchanged, ids included
    assert [{k: v for k, v in m.items() if k != "content"} for m in kept] == \
           [{k: v for k, v in m.items() if k != "content"} for m in messages]


def test_hide_only_before_a_position():
    messages = conversation(4)
    view = hide_old_tool_outputs(messages, before=6)  # turns 0 and 1 happened before the hiding
    assert tool_contents(view) == [PLACEHOLDER, PLACEHOLDER, "2" * 100, "3" * 100]


def test_overflow_views():
    messages = conversation(30, output_chars=200)
    assert overflow_views(messages, max_chars=10**9) == [(messages, 0)]
    views = overflow_views(messages, max_chars=2000)
    assert len(views) > 2 and views[0][1] == 0
    starts = [start for _, start in views]
    assert starts == sorted(set(starts))
    for (view, start), nxt in zip(views, starts[1:] + [len(messages)]):
        assert len(view) == nxt
        # the assistant turns trained from this view saw no more than the budget, or all they could hide
        assert context_chars(view[:start]) <= 2000 or all(
            c == PLACEHOLDER for c in tool_contents(view[:start]))
        assert tool_contents(view[start:]) == tool_contents(messages[start:nxt])
    kept = overflow_views(messages, max_chars=2000, keep_last=2)
    for view, start in kept[1:]:
        assert tool_contents(view[:start])[-2:] == tool_contents(messages[:start])[-2:]
