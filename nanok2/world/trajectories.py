"""Gold trajectories in the K2 chat format, recorded by running every tool call for real.

A gold conversation is what a good agent would do: short reasoning in `reasoning_content`, one tool
call per turn with a K2 id (`functions.NAME:IDX`, IDX counting every call of the conversation from 0),
the tool's real output, and a final answer in BrowseComp's three-line format. Because outputs are
recorded from the tools, replaying the calls must give them back exactly: `replay` checks that.
"""
from __future__ import annotations

import json
import re

from nanok2.world.tools import Toolbox

SYSTEM_PROMPT = (
    "You are a research agent. Answer the user's question from the document collection, using the tools: "
    "search finds documents, open reads one, python computes. Check every fact in the documents. "
    "End with exactly three lines:\nExplanation: {how you found it}\nExact Answer: {the answer}\n"
    "Confidence: {0-100}%")

ANSWER_RE = re.compile(r"^\s*Exact Answer:\s*(.*?)\s*$", re.MULTILINE)


def tool_call_id(name: str, index: int) -> str:
    return f"functions.{name}:{index}"


def format_answer(explanation: str, answer: str, confidence: int) -> str:
    return f"Explanation: {explanation}\nExact Answer: {answer}\nConfidence: {confidence}%"


def parse_answer(content: str) -> str | None:
    """The text after "Exact Answer:" in a final message, or None when there is none."""
    m = ANSWER_RE.search(content or "")
    return m.group(1) if m else None


def normalize_answer(answer: str) -> str:
    """For exact matching: case, outer spaces and a final period ignored, digit-group commas removed."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer.strip().rstrip(".").strip())
    return " ".join(text.lower().split())


class Recorder:
    """Builds one gold conversation, calling the tools as it goes."""

    def __init__(self, toolbox: Toolbox, question: str, system: str = SYSTEM_PROMPT):
        self.toolbox = toolbox
        self.messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        self.n_calls = 0

    def call(self, reasoning: str, name: str, arguments: dict) -> str:
        call_id = tool_call_id(name, self.n_calls)
        self.n_calls += 1
        args = json.dumps(arguments, ensure_ascii=False)
        self.messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning,
                              "tool_calls": [{"id": call_id, "type": "function",
                                              "function": {"name": name, "arguments": args}}]})
        output = self.toolbox.call(name, args)
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        return output

    def finish(self, reasoning: str, explanation: str, answer: str, confidence: int = 95) -> list[dict]:
        self.messages.append({"role": "assistant", "content": format_answer(explanation, answer, confidence),
                              "reasoning_content": reasoning})
        return self.messages


def replay(toolbox: Toolbox, messages: list[dict]) -> list[str]:
    """Problems found by calling every tool call of `messages` again: a wrong id, a missing or
    different output. An empty list means the trajectory replays exactly."""
    outputs = {m["tool_call_id"]: m["content"] for m in messages if m.get("role") == "tool"}
    problems, index = [], 0
    for m in messages:
        for call in m.get("tool_calls") or []:
            name = call["function"]["name"]
            if call["id"] != tool_call_id(name, index):
                problems.append(f"call {index}: id {call['id']!r}, expected {tool_call_id(name, index)!r}")
            index += 1
            if call["id"] not in outputs:
                problems.append(f"{call['id']}: no tool message answers it")
            elif toolbox.call(name, call["function"]["arguments"]) != outputs[call["id"]]:
                problems.append(f"{call['id']}: replayed output differs")
    return problems
