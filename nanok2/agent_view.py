"""The agent's live view in a terminal: each step's thinking (set apart), its tool calls and results.

A run of 300 steps is long; watching it is how one sees a model loop, drift or flood its context. The
loop (nanok2/agent.py) tells the view what happens; reasoning and content stream as the engine decodes
them, calls and results are printed when the turn is done. Plain ANSI on a terminal, plain text
elsewhere (a pipe, a log file), and nothing beyond the standard library.
"""
from __future__ import annotations

import json
import sys

DIM, BOLD, CYAN, GREEN, YELLOW, RED = "2", "1", "36", "32", "33", "31"
THINK_PREFIX = "  │ "


class TerminalView:
    """Prints a run as it goes. `result_chars`: how much of each tool output is shown."""

    def __init__(self, out=None, color: bool | None = None, result_chars: int = 300):
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.result_chars = result_chars
        self._streamed = False   # did this step's reasoning/content arrive as deltas
        self._mode = None        # what the last delta was: "reasoning", "content" or None

    def _style(self, text: str, *codes: str) -> str:
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m" if self.color and text else text

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # ---- what the loop calls ---------------------------------------------------------------------

    def start(self, question: str, tools: list[str], config) -> None:
        self._write(self._style("question: ", BOLD) + question + "\n"
                    + self._style(f"tools: {', '.join(tools)} · at most {config.max_steps} steps", DIM) + "\n")

    def begin_step(self, step: int, max_steps: int, context_action: str | None) -> None:
        self._streamed, self._mode = False, None
        line = f"── step {step}/{max_steps} "
        if context_action:
            line += f"· context: {context_action} "
        self._write("\n" + self._style(line.ljust(60, "─"), CYAN) + "\n")

    def delta(self, event) -> None:
        """A streaming event of the chat parser (kind "reasoning" or "content" with text; tool-call
        events are shown once the turn is done)."""
        if event.kind not in ("reasoning", "content") or not event.text:
            return
        self._streamed = True
        if event.kind != self._mode:
            self._end_line()
            self._write(self._style(THINK_PREFIX, DIM) if event.kind == "reasoning" else "")
            self._mode = event.kind
        text = event.text
        if event.kind == "reasoning":
            text = self._style(text.replace("\n", "\n" + THINK_PREFIX), DIM)
        self._write(text)

    def step(self, record: dict) -> None:
        if not self._streamed:
            if record.get("reasoning"):
                self._write(self._style(THINK_PREFIX + record["reasoning"].replace("\n", "\n" + THINK_PREFIX), DIM))
                self._mode = "reasoning"
            if record.get("content"):
                self._end_line()
                self._write(record["content"])
                self._mode = "content"
        self._end_line()
        for call in record["tool_calls"]:
            mark = "" if call["valid"] else self._style(f"  ✗ {call['problem']}", RED)
            self._write(self._style("  → ", YELLOW) + f"{call['name']}({_compact(call['arguments'])})" + mark + "\n")
        for res in record["results"]:
            text = res["content"]
            if len(text) > self.result_chars:
                text = text[:self.result_chars] + f" … ({res['chars']:,} chars)"
            self._write(self._style("  ← ", GREEN) + text.replace("\n", "\n    ") + "\n")
        for note in record.get("notes") or []:
            self._write(self._style(f"  ! {note}", YELLOW) + "\n")
        for err in record.get("errors") or []:
            self._write(self._style(f"  ! parse: {err['kind']}: {err['message']}", RED) + "\n")
        self._write(self._style(_tokens_line(record), DIM) + "\n")

    def final(self, result) -> None:
        self._end_line()
        answer = result.answer if result.answer is not None else "(no Exact Answer line)"
        conf = f" · confidence {result.confidence:g}%" if result.confidence is not None else ""
        self._write("\n" + self._style("answer: ", BOLD) + answer + conf + "\n")
        line = (f"stop: {result.stop_reason} · {result.steps} steps · {result.tool_calls} tool calls "
                f"({result.valid_tool_calls} valid) · tokens: {result.prompt_tokens:,} prompt "
                f"({result.cached_tokens:,} cached) + {result.completion_tokens:,} generated · {result.seconds:.1f} s")
        if result.error:
            line += f"\nerror: {result.error}"
        self._write(self._style(line, DIM) + "\n")

    def _end_line(self) -> None:
        if self._mode is not None:
            self._write("\n")
            self._mode = None


def _compact(arguments) -> str:
    """Arguments on one line: re-dumped JSON when they parse (newlines in code go), else the raw text; shortened."""
    try:
        text = json.dumps(json.loads(arguments) if isinstance(arguments, str) else arguments, ensure_ascii=False)
    except ValueError:
        text = str(arguments)
    return text if len(text) <= 200 else text[:197] + "..."


def _tokens_line(record: dict) -> str:
    prompt, cached, gen = (record.get(k) or 0 for k in ("prompt_tokens", "cached_tokens", "completion_tokens"))
    line = f"  tokens: {prompt:,} prompt ({cached:,} cached) + {gen:,} generated · {record['seconds']:.1f} s"
    if record.get("tool_seconds"):
        line += f" + tools {record['tool_seconds']:.1f} s"
    return line + (f" · finish: {record['finish_reason']}" if record.get("finish_reason") else "")
