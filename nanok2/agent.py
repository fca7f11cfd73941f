"""The agent loop: a model, a set of tools and a question -> a trajectory that ends in an answer.

K2-Thinking's agentic search is one loop run up to 300 times: render the conversation in the K2 format,
generate, read back reasoning and tool calls, run the calls, append their outputs under the ids the
model wrote, repeat. What users of other agent frameworks keep filing as bugs (docs/protocols.md) is
what this file guards against:

- reasoning not replayed within the tool loop: the messages keep `reasoning_content`, and the K2 format
  (or the OpenAI backend) sends it back for the current tool loop;
- ids rewritten: outputs go back in the model's call order under exactly the ids it wrote;
- a failing tool or a malformed call ending the run: a tool that raises, hangs or floods, and a call
  that cannot be read, become text for the model under the call's id, and the loop goes on;
- the context overflowing with tool output: before each step the prompt is measured in tokens; when it
  would not fit, every earlier tool output is hidden (K2's rule, nanok2/context.py), then only the last
  K steps are kept, then the newest outputs are cut;
- the same call forever: a call made N times in the run (in a row or in a cycle) gets a note, a few more end the run;
- a turn that ends with neither a call nor an answer (tool-call markers outside a section, a reply cut at
  its length limit, nothing at all) ending the run: the model is told what went wrong and goes on, and
  after a few such turns it is asked for its final answer;
- a step limit that ends without an answer: at the budget (or after the repeats) the model is asked
  for its final answer once more, and calls it still makes are not run;
- a crash losing the run: every step is one JSONL record, written and flushed as soon as it is done.

The model sits behind a backend (nanok2/agent_backends.py): nanok2's Engine, or any OpenAI-compatible
server. Tools are any object with `.schemas` (OpenAI tools list) and `.call(name, arguments) -> str`,
such as the world's Toolbox (nanok2/world/tools.py).
"""
from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nanok2.context import hide_old_tool_outputs
from nanok2.errors import NanoK2Error
from nanok2.world.trajectories import parse_answer

if TYPE_CHECKING:
    from nanok2.agent_backends import Backend

ANSWER_FORMAT = "Explanation: {how you found it}\nExact Answer: {the answer}\nConfidence: {0-100}%"
FORCE_ANSWER = {
    "budget": "You have used all your tool steps.",
    "repeated": "You keep making the same tool call, and its output will not change.",
    "stalled": "Your replies keep ending with neither a tool call nor an answer.",
}
FORCE_TAIL = (" Do not call any more tools. Give your final answer now, from what you have found, "
              "in exactly three lines:\n" + ANSWER_FORMAT)
REPEAT_NOTE = ("\n\nNote: you have made exactly this call {n} times in this run; its output will not change. "
               "Make a different call, or give your final answer.")
# A turn that ends with neither a tool call nor an answer, and why (the model is told, and the run goes on)
STALLED = {
    "markers": ("Your last reply wrote tool-call markers outside a <|tool_calls_section_begin|> ... "
                "<|tool_calls_section_end|> section, so no tool was called."),
    "cut": "Your last reply reached the length limit before it called a tool or answered.",
    "empty": "Your last reply neither called a tool nor answered.",
}
STALLED_TAIL = " Go on: call a tool, or give your final answer in exactly three lines:\n" + ANSWER_FORMAT
CALL_MARKER_PREFIX = "<|tool_call"   # every spelling of a K2 tool-call marker the parser knows (chat_parse)
CUT_MARKER = "\n[... {n} more characters cut ...]"
CONFIDENCE_RE = re.compile(r"^\s*Confidence:\s*(\d+(?:\.\d+)?)\s*%?", re.MULTILINE)
# Parser errors that concern the whole tool section: the calls are still run (their intent is clear),
# but none of them counts as a well-formed call.
SECTION_ERRORS = frozenset({"missing_section_begin", "unterminated_tool_section", "second_tool_section"})
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
              "array": list, "null": type(None)}


@dataclass
class AgentConfig:
    """How long a run may go and how it treats tools and the context (defaults: K2-Thinking's settings)."""
    max_steps: int = 300               # tool-calling turns before the final answer is forced (K2: 300 for BrowseComp)
    repeat_warn: int = 3               # the same call this many times in the run: a note in its output
    repeat_stop: int = 5               # ... this many: the run ends with a forced answer (in a row or in a cycle)
    stall_stop: int = 3                # turns with neither a tool call nor an answer: then the answer is forced
    tool_timeout_s: float = 60.0       # per turn, all its calls together (the python tool has its own limit)
    max_result_chars: int = 50_000     # a tool output is cut here before the model sees it (1 MB fills any context)
    hide_keep_last: int = 1            # on overflow, outputs of the last N tool turns stay (1: the ones not read yet)
    keep_last_steps: int = 4           # if hiding is not enough: keep only the last K steps (then fewer)
    context_tokens: int | None = None  # prompt + reply; None: the backend's own limit
    log_result_chars: int = 100_000    # tool outputs in the JSONL log are cut here, with a marker

    def validate(self) -> None:
        for name in ("max_steps", "repeat_warn", "repeat_stop", "stall_stop", "max_result_chars", "keep_last_steps",
                     "log_result_chars"):
            if getattr(self, name) < 1:
                raise NanoK2Error(f"agent config: {name} must be at least 1, got {getattr(self, name)}")
        if self.repeat_stop < self.repeat_warn:
            raise NanoK2Error(f"agent config: repeat_stop ({self.repeat_stop}) < repeat_warn ({self.repeat_warn})")
        if self.tool_timeout_s <= 0 or self.hide_keep_last < 0:
            raise NanoK2Error("agent config: tool_timeout_s must be > 0 and hide_keep_last >= 0")


@dataclass
class AgentResult:
    """What a run ended with. `stop_reason`: "final" (the model answered without calling tools),
    "budget" / "repeated" / "stalled" (answer forced), "context" (even the question does not fit), "backend_error",
    "interrupted" (Ctrl-C, or a bug of ours, which then propagates)."""
    question: str
    messages: list[dict]
    content: str | None = None
    answer: str | None = None          # the text after "Exact Answer:", None when the model gave none
    confidence: float | None = None
    stop_reason: str = "final"
    steps: int = 0                     # model turns, the forced final one included
    tool_calls: int = 0
    valid_tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None

    def summary(self) -> dict:
        """Everything but the messages, for the log's final record and for eval."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "messages"}


# ---- pure helpers ----------------------------------------------------------------------------------

def cut(text: str, limit: int) -> str:
    """`text` up to `limit` characters, with a marker saying how much was cut."""
    return text if len(text) <= limit else text[:limit] + CUT_MARKER.format(n=len(text) - limit)


def extract_answer(content: str | None) -> tuple[str | None, float | None]:
    """(exact answer, confidence in %) from a final message in the BrowseComp format; None where absent."""
    m = CONFIDENCE_RE.search(content or "")
    return parse_answer(content or ""), float(m.group(1)) if m else None


def stalled_turn(content: str | None, finish_reason: str | None, errors: list[dict]) -> str | None:
    """Why a turn without tool calls is no answer either (a key of STALLED), or None when it is a final
    answer. A reply in prose without the three answer lines still counts as an answer."""
    if extract_answer(content)[0] is not None:
        return None
    if any(e.get("kind") == "unexpected_marker" and CALL_MARKER_PREFIX in e.get("message", "") for e in errors):
        return "markers"   # a call the model tried to write: it counts as a tool call that did not parse
    if finish_reason == "length":
        return "cut"
    return None if (content or "").strip() else "empty"


def call_signature(call: dict) -> tuple[str, str]:
    """(name, arguments) with the arguments in canonical JSON when they parse, so that key order and
    spacing do not hide a repeat."""
    fn = call.get("function") or {}
    args = fn.get("arguments", "")
    try:
        args = json.dumps(json.loads(args) if isinstance(args, str) else args, sort_keys=True)
    except ValueError:
        pass
    return fn.get("name", ""), args


def _type_ok(value, kind) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        py = JSON_TYPES.get(k)
        if py is None:
            return True  # a type this check does not know: the tool decides
        # bool is an int in Python, but never a JSON integer or number
        if isinstance(value, py) and not (isinstance(value, bool) and k in ("integer", "number")):
            return True
    return False


def check_arguments(arguments, schema: dict) -> str | None:
    """Why `arguments` (JSON text or a dict) do not fit the tool's JSON schema, or None when they do.

    Checks what a model gets wrong: not a JSON object, a required key missing, a value of the wrong
    type, and unknown keys when the schema sets `additionalProperties: false`.
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            return f"arguments are not valid JSON ({e})"
    if not isinstance(arguments, dict):
        return "arguments are not a JSON object"
    params = schema.get("parameters") or {}
    props = params.get("properties") or {}
    missing = [k for k in params.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(missing)}"
    for key, value in arguments.items():
        if key in props and "type" in props[key] and not _type_ok(value, props[key]["type"]):
            return f"argument {key!r} must be of type {props[key]['type']}"
        if key not in props and params.get("additionalProperties") is False:
            return f"unknown argument {key!r}"
    return None


def run_tool(tools, name: str, arguments) -> str:
    """One call -> its output as text; a tool that raises or returns something else is made text too."""
    try:
        out = tools.call(name, arguments)
    except Exception as e:  # the model reads what went wrong and goes on
        return f"Error: {name} failed: {type(e).__name__}: {e}"
    if isinstance(out, str):
        return out
    try:
        return json.dumps(out, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(out)


def run_calls(tools, calls: list[tuple[str, object]], timeout_s: float) -> list[tuple[str, float]]:
    """Run (name, arguments) pairs at once; -> (output, seconds) for each, in call order.

    One daemon thread per call: a tool that never returns is abandoned at the deadline and cannot keep
    the process alive at exit (a ThreadPoolExecutor joins its threads then). The calls of one turn are
    few (K2 makes one to a handful), so a thread each is the pool.
    """
    results: list[tuple[str, float] | None] = [None] * len(calls)

    def work(i: int, name: str, arguments) -> None:
        start = time.perf_counter()
        out = run_tool(tools, name, arguments)
        results[i] = (out, time.perf_counter() - start)

    threads = [threading.Thread(target=work, args=(i, name, args), daemon=True, name=f"tool-{name}")
               for i, (name, args) in enumerate(calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [r if r is not None else (f"Error: {name} did not finish within {timeout_s:g} s and was abandoned. "
                                     "Try a smaller request.", timeout_s)
            for r, (name, _) in zip(list(results), calls)]


def fit_context(messages: list[dict], count, limit: int, hidden_before: int, hide_keep_last: int,
                keep_last_steps: int) -> tuple[list[dict], int, int, str | None] | None:
    """The view of `messages` the model gets when the prompt may hold `limit` tokens (`count(view)`).

    -> (view, its tokens, the new `hidden_before`, what was done or None), or None when even the
    question alone does not fit. In order, as long as the prompt is too long:
    1. K2's rule: hide every earlier tool output but those of the last `hide_keep_last` tool turns. This
       persists (tool outputs before message `hidden_before` stay hidden from then on), as in K2 and in
       the views the trainer makes (context.overflow_views); it also keeps the prompt's prefix stable
       for the engine's prefix cache.
    2. For small contexts: keep only the last K steps (K = keep_last_steps, down to 1), dropping older
       assistant turns with their outputs.
    3. Cut the tool outputs that are left to the longest length that fits.
    """
    view = hide_old_tool_outputs(messages, before=hidden_before)
    tokens = count(view)
    if tokens <= limit:
        return view, tokens, hidden_before, None
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("tool_calls")]
    cut_at = turns[-hide_keep_last] if 0 < hide_keep_last <= len(turns) else (0 if hide_keep_last else len(messages))
    action = None
    if cut_at > hidden_before:
        hidden_before = cut_at
        view = hide_old_tool_outputs(messages, before=hidden_before)
        tokens, action = count(view), f"hid tool outputs before message {hidden_before}"
        if tokens <= limit:
            return view, tokens, hidden_before, action
    starts = [i for i, m in enumerate(view) if m.get("role") == "assistant"]
    head = view[:starts[0]] if starts else view
    for k in range(min(keep_last_steps, len(starts) - 1), 0, -1):
        trial = head + view[starts[-k]:]
        tokens = count(trial)
        if tokens <= limit:
            return trial, tokens, hidden_before, f"kept the last {k} steps"
    trial = head + view[starts[-1]:] if starts else view
    outputs = [i for i, m in enumerate(trial) if m.get("role") == "tool"]

    def capped(chars: int) -> list[dict]:
        return [{**m, "content": cut(m.get("content") or "", chars)} if i in outputs else m
                for i, m in enumerate(trial)]

    if not outputs or count(capped(0)) > limit:
        return None
    low, high = 0, max(len(trial[i].get("content") or "") for i in outputs)
    while low < high:  # the longest cut that fits: tokens grow with the characters kept
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(capped(mid)) <= limit else (low, mid - 1)
    view = capped(low)
    return view, count(view), hidden_before, f"kept the last step, tool outputs cut to {low} characters"


# ---- the log ---------------------------------------------------------------------------------------

class TrajectoryLog:
    """One JSON object per line, flushed as written: a run that crashes leaves every finished step."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file:
            self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def read_log(path: str | Path) -> list[dict]:
    """The records of a trajectory log, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the loop --------------------------------------------------------------------------------------

class Agent:
    """Runs a backend against tools. `view` (agent_view.TerminalView or None) is told what happens."""

    def __init__(self, backend: "Backend", tools, config: AgentConfig | None = None, view=None):
        self.backend = backend
        self.tools = tools
        self.config = config or AgentConfig()
        self.config.validate()
        self.view = view

    def context_limit(self) -> int | None:
        """Prompt tokens allowed: the context less room for one reply (at most half the context)."""
        context = self.config.context_tokens or getattr(self.backend, "context_tokens", None)
        if not context:
            return None
        return context - min(getattr(self.backend, "max_tokens", 0), context // 2)

    def run(self, question: str, system_prompt: str | None = None, log_path: str | Path | None = None) -> AgentResult:
        """Answer `question`; `system_prompt` None leaves the K2 default one. The log goes to `log_path`."""
        cfg, view = self.config, self.view
        schemas = self.tools.schemas
        by_name = {s["function"]["name"]: s["function"] for s in schemas}
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": question}]
        result = AgentResult(question, messages)
        log = TrajectoryLog(log_path)
        log.write({"kind": "start", "question": question, "system": system_prompt, "tools": list(by_name),
                   "config": dataclasses.asdict(cfg),
                   "backend": getattr(self.backend, "name", type(self.backend).__name__),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        view and view.start(question, list(by_name), cfg)
        limit = self.context_limit()
        count = lambda msgs: self.backend.count_tokens(msgs, schemas)  # noqa: E731
        # made: how often each call (name, canonical arguments) was made in this run. A loop need not repeat
        # one call in a row: a cycle (open A, search B, open A, ...) repeats each of its calls as often
        hidden_before, made, forced, stalls = 0, Counter(), None, 0
        start = time.perf_counter()
        try:
            while True:
                step = result.steps + 1
                prompt, action = messages, None
                if limit is not None:
                    fitted = fit_context(messages, count, limit, hidden_before, cfg.hide_keep_last,
                                         cfg.keep_last_steps)
                    if fitted is None:
                        result.stop_reason = "context"
                        result.error = f"the question alone does not fit in {limit} prompt tokens"
                        break
                    prompt, _, hidden_before, action = fitted
                view and view.begin_step(step, cfg.max_steps, action)
                t0 = time.perf_counter()
                try:
                    reply = self.backend.complete(prompt, schemas, tool_choice="none" if forced else "auto",
                                                  on_event=view.delta if view else None)
                except Exception as e:  # a server down, a request refused: end this run, keep the log
                    result.stop_reason, result.error = "backend_error", f"{type(e).__name__}: {e}"
                    break
                seconds = time.perf_counter() - t0
                result.steps = step
                usage = reply.get("usage") or {}
                for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
                    setattr(result, key, getattr(result, key) + int(usage.get(key) or 0))
                message = {"role": "assistant", "content": reply.get("content"),
                           "reasoning_content": reply.get("reasoning_content") or ""}
                calls = list(reply.get("tool_calls") or [])
                errors = list(reply.get("errors") or [])
                record = {"kind": "step", "step": step, "reasoning": message["reasoning_content"],
                          "content": message["content"], "tool_calls": [], "results": [],
                          "prompt_tokens": usage.get("prompt_tokens"),
                          "completion_tokens": usage.get("completion_tokens"),
                          "cached_tokens": usage.get("cached_tokens"), "finish_reason": reply.get("finish_reason"),
                          "seconds": round(seconds, 3), "tool_seconds": 0.0, "errors": errors, "context": action,
                          "notes": []}
                stalled = None if calls or forced else stalled_turn(message["content"], reply.get("finish_reason"),
                                                                    errors)
                if not stalled and (not calls or forced):
                    if calls:  # tool_choice none: what it asked for is not run, and not kept in the conversation
                        record["ignored_tool_calls"] = calls
                        record["notes"].append("tool calls after the forced answer were not run")
                    messages.append(message)
                    log.write(record)
                    view and view.step(record)
                    result.content = message["content"]
                    result.answer, result.confidence = extract_answer(message["content"])
                    result.stop_reason = forced or "final"
                    break
                repeats = 0
                if stalled:  # neither a call nor an answer: the model is told, and after a few its answer forced
                    stalls += 1
                    if stalled == "markers":
                        result.tool_calls += 1
                        record["tool_calls"].append({"id": None, "name": "", "arguments": "", "valid": False,
                                                     "problem": "tool-call markers outside a tool-call section"})
                    record["notes"].append(f"no tool call and no answer ({stalled}); the model was told")
                    messages.append(message)
                else:
                    message["tool_calls"] = calls
                    messages.append(message)
                    repeats = self._act(calls, errors, by_name, record, messages, result, made)
                log.write(record)
                view and view.step(record)
                if stalls >= cfg.stall_stop:
                    forced = "stalled"
                elif repeats >= cfg.repeat_stop:
                    forced = "repeated"
                elif step >= cfg.max_steps:
                    forced = "budget"
                if forced:
                    messages.append({"role": "user", "content": FORCE_ANSWER[forced] + FORCE_TAIL})
                elif stalled:
                    messages.append({"role": "user", "content": STALLED[stalled] + STALLED_TAIL})
        except BaseException as e:  # Ctrl-C, or a bug of ours: the log says so before it propagates
            result.stop_reason, result.error = "interrupted", f"{type(e).__name__}: {e}"
            raise
        finally:
            result.seconds = time.perf_counter() - start
            log.write({"kind": "final", **result.summary()})
            log.close()
        view and view.final(result)
        return result

    def _act(self, calls, errors, by_name, record, messages, result, made: Counter) -> int:
        """Judge, run and answer the calls of one turn; -> how often the most repeated of them has now been
        made in this run (`made` counts every call of the run)."""
        cfg = self.config
        broken = {e.get("index") for e in errors if e.get("index") is not None}
        section_ok = not any(e.get("kind") in SECTION_ERRORS for e in errors)
        to_run, outputs, notes, repeats = [], [None] * len(calls), [""] * len(calls), 0
        for i, call in enumerate(calls):
            fn = call.get("function") or {}
            name, arguments = fn.get("name", ""), fn.get("arguments", "")
            problem = None
            if i in broken:
                problem = "; ".join(e["message"] for e in errors if e.get("index") == i)
                outputs[i] = (f"Error: tool call {call.get('id')!r} could not be read: {problem}. Write each call as "
                              "<|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>{JSON object}"
                              "<|tool_call_end|>.", 0.0)
            elif name not in by_name:
                problem = f"no tool named {name!r}"
                outputs[i] = (f"Error: there is no tool {name!r}; the tools are {', '.join(by_name)}.", 0.0)
            else:
                problem = check_arguments(arguments, by_name[name])
                to_run.append(i)  # a schema problem is the tool's to explain, in its own words
            if problem is None and not section_ok:
                problem = "the tool-call section is malformed"
            sig = call_signature(call)
            made[sig] += 1
            repeats = max(repeats, made[sig])
            if made[sig] >= cfg.repeat_warn:
                notes[i] = REPEAT_NOTE.format(n=made[sig])
                record["notes"].append(f"call {i} made {made[sig]} times in this run")
            result.tool_calls += 1
            result.valid_tool_calls += problem is None
            record["tool_calls"].append({"id": call.get("id"), "name": name, "arguments": arguments,
                                         "valid": problem is None, "problem": problem})
        t0 = time.perf_counter()
        ran = run_calls(self.tools, [(calls[i]["function"]["name"], calls[i]["function"]["arguments"])
                                     for i in to_run], cfg.tool_timeout_s)
        record["tool_seconds"] = round(time.perf_counter() - t0, 3)
        for i, out in zip(to_run, ran):
            outputs[i] = out
        for call, (out, seconds), note in zip(calls, outputs, notes):
            content = cut(out, cfg.max_result_chars) + note
            messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": content})
            record["results"].append({"id": call.get("id"), "content": cut(content, cfg.log_result_chars),
                                      "chars": len(out), "seconds": round(seconds, 3)})
        return repeats
