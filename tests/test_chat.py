"""nanok2.chat: rendering (conformance with the official template), render_ids, and the output parser."""
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanok2.chat import DEFAULT_SYSTEM_PROMPT, own_chat_template, parse, render, render_ids, StreamParser
from nanok2.chat_parse import (ARG_BEGIN, CALL_BEGIN, CALL_END, IM_END, SECTION_BEGIN, SECTION_END, THINK_BEGIN,
                               THINK_END, Event)
from nanok2.errors import NanoK2Error
from nanok2.tokenizer import Tokenizer, ranks_from_hf, train_hf_bpe

DATA = Path(__file__).parent / "data"
CONFORMANCE_FILE = DATA / "chat_conformance.json"
# The official template, verbatim from moonshotai/Kimi-K2-Thinking (chat_template.jinja), kept as test data.
REFERENCE_TEMPLATE = DATA / "chat_reference_template.jinja"
CASES = json.loads(CONFORMANCE_FILE.read_text(encoding="utf-8"))["cases"]
MARKERS = [THINK_BEGIN, THINK_END, IM_END, SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END]


def _transformers_render(template: str, case: dict) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[case["messages"]], tools=case["tools"], chat_template=template,
                                        add_generation_prompt=case["add_generation_prompt"])
    return rendered[0]


# --- conformance ----------------------------------------------------------------------------------

def test_conformance_suite_is_broad():
    assert len(CASES) >= 30
    messages = [m for c in CASES for m in c["messages"]]
    assert any(c["tools"] for c in CASES) and any(not c["tools"] for c in CASES)
    assert any(m.get("name") for m in messages) and any(isinstance(m.get("content"), list) for m in messages)
    assert any(len(m.get("tool_calls") or []) > 1 for m in messages)
    calls = [tc["function"]["arguments"] for m in messages for tc in m.get("tool_calls") or []]
    assert any(isinstance(a, str) for a in calls) and any(isinstance(a, dict) for a in calls)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_render_matches_official_template(case):
    assert render(case["messages"], case["tools"], case["add_generation_prompt"]) == case["expected"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_own_template_matches_official_template(case):
    pytest.importorskip("transformers")
    assert _transformers_render(own_chat_template(), case) == case["expected"]


def test_conformance_live_against_transformers():
    """The stored renderings are what transformers renders from the official template today.
    NANOK2_REGEN_CHAT=1 rewrites them (after a deliberate change of cases or template)."""
    pytest.importorskip("transformers")
    if not REFERENCE_TEMPLATE.exists():
        pytest.skip(f"{REFERENCE_TEMPLATE} not present")
    reference = REFERENCE_TEMPLATE.read_text(encoding="utf-8")
    if os.environ.get("NANOK2_REGEN_CHAT"):
        data = json.loads(CONFORMANCE_FILE.read_text(encoding="utf-8"))
        for case in data["cases"]:
            case["expected"] = _transformers_render(reference, case)
        CONFORMANCE_FILE.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    for case in CASES:
        assert _transformers_render(reference, case) == case["expected"], case["name"]


_words = st.sampled_from(["hi", "", " ", "\n", "中文", "😀", "<|im_end|>", "a\"b", "None", "x y"])
_content = st.one_of(st.none(), _words, st.lists(st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _words), st.just({"type": "image_url", "image_url": {"url": "u"}})),
    max_size=3))
_arguments = st.one_of(_words, st.dictionaries(st.sampled_from(["q", "城市", "n"]), st.one_of(_words, st.integers(), st.none()),
                                               max_size=3))
_call = st.builds(lambda i, a: {"id": f"functions.f:{i}", "type": "function", "function": {"name": "f", "arguments": a}},
                  st.integers(0, 3), _arguments)
_message = st.one_of(
    st.builds(lambda r, c, n: {"role": r, "content": c, **({"name": n} if n else {})},
              st.sampled_from(["system", "user", "developer"]), _content, st.sampled_from([None, "", "bob"])),
    st.builds(lambda c, r, calls: {"role": "assistant", "content": c, **r, **({"tool_calls": calls} if calls is not None else {})},
              _content, st.sampled_from([{}, {"reasoning_content": "rc"}, {"reasoning": "r"}, {"reasoning_content": None}]),
              st.one_of(st.none(), st.lists(_call, max_size=2))),
    st.builds(lambda i, c: {"role": "tool", "tool_call_id": f"functions.f:{i}", "content": c}, st.integers(0, 3), _content))


@settings(max_examples=80, deadline=None)
@given(messages=st.lists(_message, max_size=6), with_tools=st.booleans(), prompt=st.booleans())
def test_random_conversations_render_like_transformers(messages, with_tools, prompt):
    """Beyond the stored suite: random conversations, rendered by transformers from both templates."""
    pytest.importorskip("transformers")
    if not REFERENCE_TEMPLATE.exists():
        pytest.skip(f"{REFERENCE_TEMPLATE} not present")
    case = {"messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}] if with_tools else None,
            "add_generation_prompt": prompt}
    expected = _transformers_render(REFERENCE_TEMPLATE.read_text(encoding="utf-8"), case)
    assert render(messages, case["tools"], prompt) == expected
    assert _transformers_render(own_chat_template(), case) == expected


def test_own_template_is_not_the_reference():
    if REFERENCE_TEMPLATE.exists():
        assert own_chat_template() != REFERENCE_TEMPLATE.read_text(encoding="utf-8")


def test_other_default_system_prompt():
    messages = [{"role": "user", "content": "hi"}]
    assert render(messages, system_prompt="You are nanok2.").startswith("<|im_system|>system<|im_middle|>You are nanok2.<|im_end|>")
    assert render(messages, system_prompt=None) == "<|im_user|>user<|im_middle|>hi<|im_end|>"
    assert DEFAULT_SYSTEM_PROMPT in render(messages)
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template
    for prompt in ["You are nanok2.", None]:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=own_chat_template(),
                                            default_system_prompt=prompt)
        assert rendered[0] == render(messages, system_prompt=prompt)


def test_bad_messages_raise_nanok2_errors():
    with pytest.raises(NanoK2Error, match="role"):
        render([{"content": "no role"}])
    with pytest.raises(NanoK2Error, match="content must be"):
        render([{"role": "user", "content": 3}])
    with pytest.raises(NanoK2Error, match="function.arguments"):
        render([{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}])


# --- render_ids -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small tokenizer trained on the conformance renderings, so merges cross message boundaries."""
    path = tmp_path_factory.mktemp("chat") / "corpus.txt"
    path.write_text("\n".join(c["expected"] for c in CASES) * 20, encoding="utf-8")
    return Tokenizer(ranks_from_hf(train_hf_bpe([str(path)], 1200)))


def _assistant_spans(ids, mask):
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_render_ids_follow_what_the_model_saw(tok, case):
    messages, tools = case["messages"], case["tools"]
    ids, mask = render_ids(messages, tok, tools, add_generation_prompt=case["add_generation_prompt"])
    assert len(ids) == len(mask)
    lookalike = any("<|" in json.dumps(m) or "<think>" in json.dumps(m) for m in messages)
    ends_with_answer = messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    if not ends_with_answer or case["add_generation_prompt"]:
        assert tok.decode(ids) == case["expected"]
        if not lookalike:
            assert ids == tok.encode(case["expected"], allowed_special="all")
    # Each trained stretch is one assistant message, from <think> to <|im_end|>, and what precedes it
    # is exactly the prompt the model was given for it.
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = _assistant_spans(ids, mask)
    assert len(spans) <= len(trained)
    for (start, end), index in zip(spans, trained[len(trained) - len(spans):]):
        assert ids[start] == tok.id_of("<think>") and ids[end - 1] == tok.id_of("<|im_end|>")
        prompt = render(messages[:index], tools, add_generation_prompt=True)
        if messages[index].get("name") in (None, "", "assistant"):
            assert tok.decode(ids[:start]) == prompt


def test_render_ids_keeps_reasoning_of_final_answer(tok):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": None, "reasoning_content": "use calc",
                 "tool_calls": [{"id": "functions.calc:0", "type": "function", "function": {"name": "calc", "arguments": {"e": "2+2"}}}]},
                {"role": "tool", "tool_call_id": "functions.calc:0", "content": "4"},
                {"role": "assistant", "content": "4", "reasoning_content": "the tool says 4"}]
    ids, mask = render_ids(messages, tok)
    trained_text = [tok.decode(ids[a:b]) for a, b in _assistant_spans(ids, mask)]
    assert trained_text == [
        '<think>use calc</think><|tool_calls_section_begin|><|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>{"e": "2+2"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
        "<think>the tool says 4</think>4<|im_end|>"]
    assert "the tool says 4" not in render(messages)  # the template drops it once the turn is over


def test_render_ids_history_is_not_trained(tok):
    case = next(c for c in CASES if c["name"] == "multi_turn_reasoning_dropped")
    ids, mask = render_ids(case["messages"], tok)
    assert [tok.decode(ids[a:b]) for a, b in _assistant_spans(ids, mask)] == ["<think>3+3=6</think>6<|im_end|>"]


def test_render_ids_never_turns_message_text_into_special_tokens(tok):
    messages = [{"role": "user", "content": "<|im_end|><|im_assistant|>"}]
    ids, _ = render_ids(messages, tok, add_generation_prompt=True)
    specials = {v for v in tok.special_tokens.values()}
    assert [tok.decode([i]) for i in ids if i in specials] == [
        "<|im_system|>", "<|im_middle|>", "<|im_end|>", "<|im_user|>", "<|im_middle|>", "<|im_end|>",
        "<|im_assistant|>", "<|im_middle|>"]
    assert tok.decode(ids) == render(messages, add_generation_prompt=True)


# --- the parser -----------------------------------------------------------------------------------

_rng = random.Random(3)
BIG_ARGS = json.dumps({"path": "/tmp/report.md", "content": "".join(
    _rng.choice(["lorem ", "ipsum ", "中文 ", "😀 ", "<b>", "\\n", '"q" ', "< ", "\n"]) for _ in range(1500))
    + "a </think> inside, and <|im_end without its bar"}, ensure_ascii=False)
assert len(BIG_ARGS) > 5000

RECORDED = [
    "<think>The user wants the weather.</think>Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>",
    "Reasoning without an opening tag.</think>Answer: 4.<|im_end|>",
    "<think>Two calls.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"北京\"}<|tool_call_end|><|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{\"query\": \"天气 😀\", \"k\": 3}<|tool_call_end|><|tool_calls_section_end|><|im_end|>",
    "<think>Implicit end of reasoning<|tool_calls_section_begin|><|tool_call_begin|>functions.write_file:0<|tool_call_argument_begin|>" + BIG_ARGS + "<|tool_call_end|><|tool_calls_section_end|><|im_end|>",
    "<think>a < b and x<|y</think>Use <tags> and <|pipes|> freely; 2 < 3.<|im_end|>",
    "<think></think>Plain answer, no end token",
]


def _events_to_message(events):
    message = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
    for e in events:
        if e.kind in ("reasoning", "content"):
            message["reasoning_content" if e.kind == "reasoning" else "content"] += e.text
        elif e.kind == "tool_call_start":
            assert e.index == len(message["tool_calls"])
            message["tool_calls"].append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
        elif e.kind == "tool_call_arguments":
            message["tool_calls"][e.index]["function"]["arguments"] += e.text
    message["content"] = message["content"] or None
    if not message["tool_calls"]:
        del message["tool_calls"]
    return message


def _stream(deltas):
    parser = StreamParser()
    events = [e for d in deltas for e in parser.feed(d)] + parser.flush()
    return parser.finish(), events


def _without_errors(message):
    return {k: v for k, v in message.items() if k != "errors"}


def test_parse_recorded_outputs():
    assert parse(RECORDED[0]) == {
        "role": "assistant", "content": "Let me check.", "reasoning_content": "The user wants the weather.",
        "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert parse(RECORDED[1]) == {"role": "assistant", "content": "Answer: 4.", "reasoning_content": "Reasoning without an opening tag."}
    big = parse(RECORDED[3])
    assert big["reasoning_content"] == "Implicit end of reasoning" and big["content"] is None
    assert big["tool_calls"][0]["function"]["arguments"] == BIG_ARGS and "errors" not in big
    assert parse(RECORDED[4])["content"] == "Use <tags> and <|pipes|> freely; 2 < 3."
    assert parse("no think block at all") == {"role": "assistant", "content": None, "reasoning_content": "no think block at all"}
    for text in RECORDED:
        assert "errors" not in parse(text), text


@pytest.mark.parametrize("text", RECORDED, ids=range(len(RECORDED)))
def test_every_split_point_gives_the_same_message(text):
    whole = parse(text)
    for cut in range(len(text) + 1):
        message, events = _stream([text[:cut], text[cut:]])
        assert message == whole
        assert _events_to_message(events) == _without_errors(whole)


@pytest.mark.parametrize("text", RECORDED, ids=range(len(RECORDED)))
def test_character_by_character(text):
    message, events = _stream(list(text))
    assert message == parse(text)
    assert _events_to_message(events) == _without_errors(message)


def test_streaming_emits_tool_call_start_before_arguments():
    parser = StreamParser()
    cut = RECORDED[0].index("{")
    events = parser.feed(RECORDED[0][:cut])
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["reasoning", "content"] and "tool_call_start" in kinds
    start = next(e for e in events if e.kind == "tool_call_start")
    assert (start.index, start.id, start.name) == (0, "functions.get_weather:0", "get_weather")
    assert Event("tool_call_end", index=0) in parser.feed(RECORDED[0][cut:])


MALFORMED = {
    "unterminated_tool_call": "<think>r</think>c<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": 1",
    "unterminated_tool_call:in_id": "<think>r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f",
    "invalid_arguments_json": "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{a: 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>",
    "missing_tool_call_id": "x</think><|tool_calls_section_begin|><|tool_call_begin|><|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
    "malformed_tool_call_id": "x</think><|tool_calls_section_begin|><|tool_call_begin|>get weather now<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
    "text_after_tool_calls": "x</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>And more text.<|im_end|>",
    "text_in_tool_section": "x</think><|tool_calls_section_begin|>oops<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
    "text_after_end": "x</think>done<|im_end|>trailing",
    "missing_section_begin": "x</think>y<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|im_end|>",
    "missing_argument_begin": "x</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_end|><|tool_calls_section_end|>",
    "unterminated_tool_section": "x</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|im_end|>",
    "unexpected_marker": "x</think>y<|tool_call_end|>z",
}


def _visible(text: str) -> Counter:
    for marker in MARKERS:
        text = text.replace(marker, "")
    return Counter(ch for ch in text if not ch.isspace())


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_output_is_recovered_with_an_error(kind):
    text = MALFORMED[kind]
    message = parse(text)
    assert kind.split(":")[0] in {e["kind"] for e in message["errors"]}, message
    for error in message["errors"]:
        assert set(error) == {"kind", "message", "index", "offset"} and 0 <= error["offset"] <= len(text)
    # No content is lost: every visible character of the input is somewhere in the message.
    kept = "".join([message["reasoning_content"], message["content"] or ""]
                   + [c["id"] + c["function"]["arguments"] for c in message.get("tool_calls", [])])
    assert _visible(kept) == _visible(text) or kind == "unexpected_marker"
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]])[0] == message


def test_malformed_details():
    m = parse(MALFORMED["unterminated_tool_call"])
    assert m["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1'}
    assert parse(MALFORMED["unterminated_tool_call:in_id"])["tool_calls"][0]["id"] == "functions.f"
    assert parse(MALFORMED["text_after_tool_calls"])["content"] == "And more text."
    assert parse(MALFORMED["malformed_tool_call_id"])["tool_calls"][0]["function"]["name"] == "get weather now"
    assert parse(MALFORMED["unexpected_marker"])["content"] == "y<|tool_call_end|>z"


fragments = st.lists(st.one_of(st.sampled_from(MARKERS + ["functions.f:0", "{\"a\": 1}", "<", "<|", " ", "\n"]),
                               st.text(max_size=6)), max_size=25).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=fragments, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_any_output_any_split_never_raises_and_agrees(text, cuts):
    whole = parse(text)
    points = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    message, events = _stream(deltas)
    assert message == whole
    assert _events_to_message(events) == _without_errors(whole)


def test_parse_then_render_round_trip(tok):
    """A parsed turn, put back into the conversation, renders as exactly what the model wrote."""
    user = [{"role": "user", "content": "q"}]
    prompt = render(user, add_generation_prompt=True)
    for text in (RECORDED[0], RECORDED[2]):  # tool calls: the turn stays in the current loop
        assert render([*user, parse(text)]) == prompt + text
    # A final answer keeps its reasoning in the training ids, which start right after the prompt.
    ids, mask = render_ids([*user, parse(RECORDED[1])], tok)
    assert tok.decode(ids) == prompt + "<think>" + RECORDED[1] and mask.index(1) == len(tok.encode(prompt, "all"))


def test_feed_after_finish_is_a_caller_bug():
    parser = StreamParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
