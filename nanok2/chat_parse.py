"""Reading K2's output back: one assistant turn's raw text -> streaming events -> an OpenAI-style message.

The server streams reasoning, content and tool calls as the model writes them, and the agent needs the
final message; both come from one incremental parser, so a stream and a one-shot parse cannot disagree.
It follows vLLM's `kimi_k2` reasoning and tool parsers: reasoning ends at `</think>`, or implicitly at
`<|tool_calls_section_begin|>`; a call is `<|tool_call_begin|>{id}<|tool_call_argument_begin|>{json}
<|tool_call_end|>` and its function name comes from the id (`functions.get_weather:0` -> `get_weather`);
`<|im_end|>` ends the turn. Special tokens arrive as their text.

Where the text starts: the K2-Thinking generation prompt ends with `<|im_middle|>`, and the model then
writes `<think>`. The parser accepts both that and text that starts directly with the reasoning (a
prompt that already opened the think block, as vLLM assumes): a leading `<think>` is dropped, and
everything up to `</think>` (or the tool section) is reasoning. Output with no `</think>` at all is
therefore all reasoning, as in vLLM's parser.

Malformed output never raises. The parser keeps what it can (an unterminated call keeps the arguments
written so far, invalid JSON arguments are kept verbatim, stray text becomes content) and records a
structured error `{"kind", "message", "index", "offset"}` for each problem; `finish()` lists them under
`"errors"` (absent when there were none).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

THINK_BEGIN, THINK_END, IM_END = "<think>", "</think>", "<|im_end|>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

# Markers as the model writes them -> their meaning. vLLM also accepts the singular section spelling.
_MARKERS = {m: m for m in (THINK_BEGIN, THINK_END, IM_END, SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END)}
_MARKERS |= {"<|tool_call_section_begin|>": SECTION_BEGIN, "<|tool_call_section_end|>": SECTION_END}
_MARKER_RE = re.compile("|".join(map(re.escape, _MARKERS)))
_LONGEST_MARKER = max(map(len, _MARKERS))
# The shape of a well-formed id: `functions.NAME:INDEX` (the `functions.` prefix is optional for vLLM).
_ID_SHAPE = re.compile(r"(?:[\w.-]*\.)?[\w-]+:\d+")

# Parser states: where the next text goes.
REASONING, CONTENT, SECTION, CALL_ID, CALL_ARGS, AFTER_SECTION, ENDED = range(7)


def _partial_marker_start(text: str, pos: int) -> int:
    """Where, at or after `pos`, a tail of `text` begins that is the start of some marker (len(text) if none)."""
    for i in range(max(pos, len(text) - _LONGEST_MARKER + 1), len(text)):
        if text[i] == "<" and any(m.startswith(text[i:]) for m in _MARKERS):
            return i
    return len(text)


@dataclass(frozen=True)
class Event:
    """One streaming event. `kind` is "reasoning" or "content" (with `text`), "tool_call_start" (with
    `index`, `id`, `name`), "tool_call_arguments" (with `index`, `text`) or "tool_call_end" (`index`)."""
    kind: str
    text: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None


def function_name(call_id: str) -> str:
    """`functions.get_weather:0` -> `get_weather`, as vLLM derives it."""
    return call_id.split(":")[0].split(".")[-1]


class StreamParser:
    """Incremental parser of one assistant turn: `feed(delta)` -> events, `flush()` -> the last events,
    `finish()` -> the message. The events of `feed` and `flush` concatenate to the message, and the
    message does not depend on how the text was split into deltas."""

    def __init__(self):
        self.state = REASONING
        self.errors: list[dict] = []
        self._pending = ""        # text held back because it may be the start of a marker
        self._stray = ""          # text seen between calls or after the section: judged at the next marker
        self._stray_at = 0
        self._at = 0              # stream offset (characters) of what is being handled, for errors
        self._started = False     # has anything been read (a leading <think> is only dropped first)
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[dict] = []
        self._call_id: list[str] = []
        self._flushed = False
        self._message: dict | None = None

    # --- public API ---------------------------------------------------------------------------------

    def feed(self, delta: str) -> list[Event]:
        """Consume the next piece of raw model text; return the events it completes."""
        if self._flushed:
            raise RuntimeError("StreamParser.feed after flush/finish")  # a bug in the caller, not bad input
        events: list[Event] = []
        text = self._pending + delta
        base = self._at - len(self._pending)  # stream offset of text[0]
        pos = 0                               # text[pos:] is not handled yet
        while found := _MARKER_RE.search(text, pos):
            self._text(text[pos:found.start()], base + pos, events)
            self._at = base + found.start()
            self._marker(found.group(), events)
            pos = found.end()
        hold = _partial_marker_start(text, pos)  # a tail that may still grow into a marker waits
        self._text(text[pos:hold], base + pos, events)
        self._pending = text[hold:]
        self._at = base + len(text)
        return events

    def flush(self) -> list[Event]:
        """End of the stream: emit what was held back and close an open tool call."""
        if self._flushed:
            return []
        events: list[Event] = []
        self._text(self._pending, self._at - len(self._pending), events)
        self._pending = ""
        self._judge_stray(events)
        index = len(self._calls)
        if self.state == CALL_ID:
            self._error("unterminated_tool_call", f"the text ended inside the id of tool call {index}", index)
            self._start_call(events)
            self._end_call(events)
        elif self.state == CALL_ARGS:
            self._error("unterminated_tool_call", f"the text ended inside tool call {index - 1}, before {CALL_END}",
                        index - 1)
            self._end_call(events)
        elif self.state == SECTION:
            self._error("unterminated_tool_section", f"the text ended before {SECTION_END}")
        self._flushed = True
        return events

    def finish(self) -> dict:
        """The assistant message: `role`, `content` (None when empty), `reasoning_content` ("" when
        empty: the official template would print a None as "None"), `tool_calls` when there are any,
        `errors` when something was malformed."""
        if self._message is None:
            self.flush()
            message = {"role": "assistant", "content": "".join(self._content) or None,
                       "reasoning_content": "".join(self._reasoning)}
            if self._calls:
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                    for c in self._calls]
            if self.errors:
                message["errors"] = list(self.errors)
            self._message = message
        return self._message

    # --- text and markers ---------------------------------------------------------------------------

    def _text(self, text: str, at: int, events: list[Event]) -> None:
        if not text:
            return
        self._started = True
        if self.state == REASONING:
            self._emit("reasoning", text, events)
        elif self.state == CONTENT:
            self._emit("content", text, events)
        elif self.state == CALL_ID:
            self._call_id.append(text)
        elif self.state == CALL_ARGS:
            index = len(self._calls) - 1
            self._calls[index]["arguments"].append(text)
            events.append(Event("tool_call_arguments", text=text, index=index))
        else:
            # Between calls, after the section, after <|im_end|>: whitespace there is layout, anything
            # else is an error. Which one it is can only be told once the stretch is complete.
            if not self._stray:
                self._stray_at = at
            self._stray += text

    def _judge_stray(self, events: list[Event]) -> None:
        stray, self._stray = self._stray, ""
        if not stray or stray.isspace():
            return
        kind, where = {SECTION: ("text_in_tool_section", "between tool calls"),
                       AFTER_SECTION: ("text_after_tool_calls", f"after {SECTION_END}"),
                       ENDED: ("text_after_end", f"after {IM_END}")}[self.state]
        self._error(kind, f"text {stray[:40]!r} {where}; kept as content", at=self._stray_at)
        self._emit("content", stray, events)

    def _emit(self, kind: str, text: str, events: list[Event]) -> None:
        (self._reasoning if kind == "reasoning" else self._content).append(text)
        events.append(Event(kind, text=text))

    def _literal(self, marker: str, events: list[Event], complain: bool) -> None:
        """A marker that means nothing where it stands: kept as text there."""
        if complain:
            self._error("unexpected_marker", f"{marker} where it means nothing; kept as text")
        self._text(marker, self._at, events)

    def _marker(self, marker: str, events: list[Event]) -> None:
        meaning = _MARKERS[marker]
        if meaning == THINK_BEGIN and not self._started:
            self._started = True
            return  # the model opened the think block itself
        self._started = True
        state = self.state
        if state in (SECTION, AFTER_SECTION, ENDED):
            self._judge_stray(events)
        if state in (REASONING, CONTENT):
            if meaning == THINK_END and state == REASONING:
                self.state = CONTENT
            elif meaning == SECTION_BEGIN:
                self.state = SECTION
            elif meaning == CALL_BEGIN:
                self._error("missing_section_begin", f"{CALL_BEGIN} without {SECTION_BEGIN} before it")
                self.state = CALL_ID
            elif meaning == IM_END:
                self.state = ENDED
            else:  # <think> later on, </think> in content: text; a stray tool marker: text, and an error
                self._literal(marker, events, complain=meaning not in (THINK_BEGIN, THINK_END))
        elif state == SECTION and meaning in (CALL_BEGIN, SECTION_END, IM_END):
            if meaning == IM_END:
                self._error("unterminated_tool_section", f"{IM_END} before {SECTION_END}")
            self.state = {CALL_BEGIN: CALL_ID, SECTION_END: AFTER_SECTION, IM_END: ENDED}[meaning]
        elif state == CALL_ID:
            self._start_call(events)
            if meaning != ARG_BEGIN:
                self._error("missing_argument_begin", f"tool call {len(self._calls) - 1} has no {ARG_BEGIN}",
                            len(self._calls) - 1)
                self._marker(marker, events)
        elif state == CALL_ARGS:
            index = len(self._calls) - 1
            if meaning in (CALL_END, CALL_BEGIN, SECTION_END, IM_END):
                if meaning != CALL_END:
                    self._error("unterminated_tool_call", f"tool call {index} not closed by {CALL_END} before {marker}",
                                index)
                self._end_call(events)
                self.state = SECTION
                if meaning != CALL_END:
                    self._marker(marker, events)
            else:  # arguments may hold such text (a JSON string containing "</think>")
                self._text(marker, self._at, events)
        elif state == AFTER_SECTION and meaning in (IM_END, SECTION_BEGIN):
            if meaning == SECTION_BEGIN:
                self._error("second_tool_section", f"a second {SECTION_BEGIN}; its calls are kept")
            self.state = ENDED if meaning == IM_END else SECTION
        else:
            self._literal(marker, events, complain=True)

    # --- tool calls ---------------------------------------------------------------------------------

    def _start_call(self, events: list[Event]) -> None:
        index = len(self._calls)
        call_id = "".join(self._call_id).strip()
        self._call_id = []
        if not call_id:
            self._error("missing_tool_call_id", f"tool call {index} has no id, so no function name", index)
        elif not _ID_SHAPE.fullmatch(call_id):
            self._error("malformed_tool_call_id", f"tool call {index} id {call_id[:60]!r} is not "
                        "'functions.NAME:INDEX'; name taken from it as vLLM does", index)
        self._calls.append({"id": call_id, "name": function_name(call_id), "arguments": []})
        self.state = CALL_ARGS
        events.append(Event("tool_call_start", index=index, id=call_id, name=function_name(call_id)))

    def _end_call(self, events: list[Event]) -> None:
        index = len(self._calls) - 1
        arguments = "".join(self._calls[index]["arguments"])
        try:
            json.loads(arguments)
        except ValueError as e:
            self._error("invalid_arguments_json", f"tool call {index} arguments are not valid JSON ({e}); "
                        "kept verbatim", index)
        events.append(Event("tool_call_end", index=index))

    def _error(self, kind: str, message: str, index: int | None = None, at: int | None = None) -> None:
        self.errors.append({"kind": kind, "message": message, "index": index,
                            "offset": self._at if at is None else at})


def parse(text: str) -> dict:
    """One assistant turn's complete raw text -> the OpenAI-style message (see `StreamParser.finish`)."""
    parser = StreamParser()
    parser.feed(text)
    return parser.finish()
