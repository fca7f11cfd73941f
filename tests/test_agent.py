"""The agent loop on real tools: gold trajectories replayed, failing tools, malformed calls, repeats, the
budget, context overflow, the log, the OpenAI backend through the real client, and the Engine end to end.

Loop behaviour is tested with `ScriptedModel`, which stands in for the model (not the unit under test):
it writes raw K2 text for each turn, read back through the real StreamParser, as the engine's output is.
"""
import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanok2.agent import (CUT_MARKER, Agent, AgentConfig, check_arguments, extract_answer, fit_context,
                          read_log)
from nanok2.agent_backends import OpenAIBackend, from_openai, openai_request, to_openai_messages
from nanok2.agent_view import TerminalView
from nanok2.chat import StreamParser, render
from nanok2.cli import main
from nanok2.context import PLACEHOLDER
from nanok2.eval_world import (QUOTING_FAMILIES, answer_key, evidence_chain, evidence_followed, evidence_quoted,
                               first_miss, is_correct, opened_docids, summarize, where_wrong)
from nanok2.world import SYSTEM_PROMPT, Toolbox, build_world, make_tasks


def k2_turn(reasoning: str = "", content: str = "", calls=()) -> str:
    """The raw text of one assistant turn as K2 writes it; calls are (id, arguments JSON text)."""
    text = f"<think>{reasoning}</think>{content}"
    if calls:
        text += "<|tool_calls_section_begin|>" + "".join(
            f"<|tool_call_begin|>{cid}<|tool_call_argument_begin|>{args}<|tool_call_end|>" for cid, args in calls
        ) + "<|tool_calls_section_end|>"
    return text + "<|im_end|>"


def answer_turn(answer: str, reasoning: str = "done") -> str:
    return k2_turn(reasoning, f"Explanation: found it\nExact Answer: {answer}\nConfidence: 90%")


class ScriptedModel:
    """A backend whose turns come from `script`: a list of raw texts, or a function (prompt, step) -> text.
    Tokens are characters of the K2 rendering."""

    name = "scripted"

    def __init__(self, script, context_tokens=None, max_tokens=0):
        self.script = script
        self.context_tokens = context_tokens
        self.max_tokens = max_tokens
        self.prompts, self.tool_choices, self.prompt_tokens = [], [], []

    def count_tokens(self, messages, tools):
        return len(render(messages, tools, add_generation_prompt=True))

    def complete(self, messages, tools, tool_choice="auto", on_event=None):
        self.prompts.append(copy.deepcopy(messages))
        self.tool_choices.append(tool_choice)
        self.prompt_tokens.append(self.count_tokens(messages, tools))
        step = len(self.prompts)
        text = self.script(messages, step) if callable(self.script) else self.script[step - 1]
        parser = StreamParser()
        events = [e for i in range(0, len(text), 7) for e in parser.feed(text[i:i + 7])] + parser.flush()
        for e in events:
            on_event and on_event(e)
        message = parser.finish()
        finish = "tool_calls" if message.get("tool_calls") else "stop" if text.endswith("<|im_end|>") else "length"
        return {**message, "finish_reason": finish,
                "usage": {"prompt_tokens": self.prompt_tokens[-1], "completion_tokens": len(text),
                          "cached_tokens": 0}}


@pytest.fixture(scope="module")
def world():
    return build_world(7, 600)


@pytest.fixture(scope="module")
def toolbox(world):
    return Toolbox(world.corpus)


def tool_outputs(messages):
    return [(m["tool_call_id"], m["content"]) for m in messages if m["role"] == "tool"]


# ---- gold trajectories ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family,hops", [("multihop", 2), ("trail", 4), ("arithmetic", 2)])
def test_gold_trajectory_replays_through_the_loop(world, toolbox, tmp_path, family, hops):
    task = make_tasks(world, toolbox, family, hops, 1)[0]
    gold = [m for m in task.messages if m["role"] == "assistant"]
    turns = [k2_turn(m["reasoning_content"], m["content"] or "",
                     [(c["id"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]) for m in gold]
    model = ScriptedModel(turns)
    result = Agent(model, toolbox).run(task.question, SYSTEM_PROMPT, tmp_path / "log.jsonl")
    assert result.stop_reason == "final" and result.steps == len(gold)
    assert tool_outputs(result.messages) == tool_outputs(task.messages)   # same ids, same outputs
    assert is_correct(result.answer, task.answer) and result.confidence == 95
    assert result.tool_calls == result.valid_tool_calls == len(gold) - 1
    # reasoning is replayed within the tool loop: the last prompt still holds the first turn's reasoning
    assert gold[0]["reasoning_content"] in render(model.prompts[-1])
    records = read_log(tmp_path / "log.jsonl")
    assert [r["kind"] for r in records] == ["start"] + ["step"] * len(gold) + ["final"]
    assert records[1]["reasoning"] == gold[0]["reasoning_content"]
    assert records[1]["results"][0]["content"] == task.messages[3]["content"]
    assert records[-1]["answer"] == task.answer


def test_a_300_step_trail_replays_within_a_small_context(tmp_path):
    """K2's long chain: 300 tool calls in a row, the context kept small by hiding old outputs."""
    world = build_world(0)  # the default size holds trails of 300 notes
    toolbox = Toolbox(world.corpus)
    task = make_tasks(world, toolbox, "trail", 300, 1)[0]
    gold = [m for m in task.messages if m["role"] == "assistant"]
    turns = [k2_turn(m["reasoning_content"], m["content"] or "",
                     [(c["id"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]) for m in gold]
    model = ScriptedModel(turns, context_tokens=30_000, max_tokens=2_000)
    agent = Agent(model, toolbox, AgentConfig(max_steps=301))
    result = agent.run(task.question, SYSTEM_PROMPT, tmp_path / "log.jsonl")
    assert result.steps == 301 and result.stop_reason == "final" and is_correct(result.answer, task.answer)
    assert tool_outputs(result.messages) == tool_outputs(task.messages)
    assert max(model.prompt_tokens) <= agent.context_limit()
    assert any(r["context"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "step")


# ---- tools that fail -----------------------------------------------------------------------------------

def _schema(name, **props):
    return {"type": "function", "function": {"name": name, "description": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()}, "required": list(props)}}}


class UnrulyTools:
    """The world's tools plus some that misbehave: raise, hang, flood, or need a partner running at once."""

    def __init__(self, toolbox):
        self.toolbox = toolbox
        self.barrier = threading.Barrier(2, timeout=5)
        self.schemas = toolbox.schemas + [_schema(n) for n in ("boom", "hang", "flood", "meet")]

    def call(self, name, arguments):
        if name == "boom":
            raise RuntimeError("kaput")
        if name == "hang":
            time.sleep(30)
            return "late"
        if name == "flood":
            return "x" * 1_000_000
        if name == "meet":  # passes only when the other call of the turn runs at the same time
            return f"met {self.barrier.wait()}"
        return self.toolbox.call(name, arguments)


def test_tools_that_raise_hang_or_flood_leave_the_loop_running(toolbox, tmp_path):
    calls = [("functions.boom:0", "{}"), ("functions.hang:1", "{}"), ("functions.flood:2", "{}"),
             ("functions.search:3", '{"query": "river"}')]
    model = ScriptedModel([k2_turn("try them all", calls=calls), answer_turn("x")])
    config = AgentConfig(tool_timeout_s=0.5, max_result_chars=20_000, log_result_chars=5_000)
    start = time.perf_counter()
    result = Agent(model, UnrulyTools(toolbox), config).run("q", log_path=tmp_path / "log.jsonl")
    assert time.perf_counter() - start < 10  # the hanging tool was abandoned, not waited for
    assert result.stop_reason == "final" and result.answer == "x" and result.steps == 2
    outputs = tool_outputs(result.messages)
    assert [cid for cid, _ in outputs] == [cid for cid, _ in calls]  # call order, exact ids
    assert outputs[0][1] == "Error: boom failed: RuntimeError: kaput"
    assert outputs[1][1].startswith("Error: hang did not finish within 0.5 s")
    assert outputs[2][1] == "x" * 20_000 + CUT_MARKER.format(n=980_000)
    assert outputs[3][1] == toolbox.call("search", '{"query": "river"}')
    # the next prompt carried all four outputs under their ids
    assert tool_outputs(model.prompts[1]) == outputs
    records = read_log(tmp_path / "log.jsonl")
    assert [r["kind"] for r in records] == ["start", "step", "step", "final"]
    flood = records[1]["results"][2]
    assert flood["chars"] == 1_000_000 and len(flood["content"]) < 5_100 and "more characters cut" in flood["content"]


def test_calls_of_one_turn_run_concurrently(toolbox):
    model = ScriptedModel([k2_turn(calls=[("functions.meet:0", "{}"), ("functions.meet:1", "{}")]), answer_turn("y")])
    result = Agent(model, UnrulyTools(toolbox)).run("q")
    assert sorted(c for _, c in tool_outputs(result.messages)) == ["met 0", "met 1"]


def test_malformed_tool_calls_get_errors_under_their_ids(toolbox, tmp_path):
    broken = ("<think>hmm</think><|tool_calls_section_begin|>"
              '<|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>{"query": "x"<|tool_call_end|>'
              "<|tool_call_begin|><|tool_call_argument_begin|>{}<|tool_call_end|>"
              "<|tool_call_begin|>functions.nosuch:2<|tool_call_argument_begin|>{}<|tool_call_end|>"
              '<|tool_call_begin|>functions.search:3<|tool_call_argument_begin|>{"query": 5}<|tool_call_end|>'
              '<|tool_call_begin|>functions.open:4<|tool_call_argument_begin|>{"docid": "d0001"')  # cut off
    model = ScriptedModel([broken, "garbage <|tool_call_end|> with no calls", answer_turn("7")])
    result = Agent(model, toolbox).run("q", log_path=tmp_path / "log.jsonl")
    assert result.steps == 3 and result.stop_reason == "final" and result.answer == "7"
    # the second turn's markers formed no call: one more call that did not parse, and the model is told
    assert "tool-call markers outside" in model.prompts[2][-1]["content"]
    assert model.prompts[2][-1]["role"] == "user" and model.prompts[2][-2]["role"] == "assistant"
    outputs = tool_outputs(result.messages)
    assert [cid for cid, _ in outputs] == ["functions.search:0", "", "functions.nosuch:2", "functions.search:3",
                                           "functions.open:4"]
    assert "could not be read" in outputs[0][1] and "not valid JSON" in outputs[0][1]
    assert "could not be read" in outputs[1][1] and "no id" in outputs[1][1]
    assert outputs[2][1] == "Error: there is no tool 'nosuch'; the tools are search, open, python."
    assert outputs[3][1] == "Error: search: argument 'query' must be a string."  # the tool's own words
    assert "could not be read" in outputs[4][1]
    assert result.tool_calls == 6 and result.valid_tool_calls == 0
    stalled = read_log(tmp_path / "log.jsonl")[2]
    assert stalled["tool_calls"] == [{"id": None, "name": "", "arguments": "", "valid": False,
                                      "problem": "tool-call markers outside a tool-call section"}]
    step = read_log(tmp_path / "log.jsonl")[1]
    assert {e["kind"] for e in step["errors"]} >= {"invalid_arguments_json", "missing_tool_call_id",
                                                    "unterminated_tool_call"}
    assert [c["valid"] for c in step["tool_calls"]] == [False] * 5


def test_a_turn_with_neither_a_call_nor_an_answer_does_not_end_the_run(toolbox, tmp_path):
    """A reply cut at its length limit, or one with nothing after the thinking, is no answer: the model is
    told and goes on; after `stall_stop` such turns its final answer is forced. Prose still ends the run."""
    cut, empty = "<think>Kafaho, Kafaho, Kafaho, Kaf", k2_turn("nothing more")
    model = ScriptedModel([cut, empty, k2_turn("so", "It was built in 1871.")])
    result = Agent(model, toolbox).run("q", log_path=tmp_path / "log.jsonl")
    assert result.stop_reason == "final" and result.steps == 3 and result.tool_calls == 0
    assert result.content == "It was built in 1871." and result.answer is None
    assert "reached the length limit" in model.prompts[1][-1]["content"]
    assert "neither called a tool nor answered" in model.prompts[2][-1]["content"]
    assert [len(r["notes"]) for r in read_log(tmp_path / "log.jsonl")[1:-1]] == [1, 1, 0]

    def stuck(prompt, step):
        return answer_turn("forced") if "final answer now" in prompt[-1]["content"] else empty

    model = ScriptedModel(stuck)
    result = Agent(model, toolbox, AgentConfig(stall_stop=3)).run("q")
    assert result.stop_reason == "stalled" and result.answer == "forced" and result.steps == 4
    assert model.tool_choices == ["auto"] * 3 + ["none"]
    assert "keep ending with neither a tool call nor an answer" in model.prompts[-1][-1]["content"]


def test_check_arguments_follows_the_schema(toolbox):
    search = toolbox.schemas[0]["function"]
    assert check_arguments('{"query": "a", "k": 3}', search) is None
    assert check_arguments({"query": "a"}, search) is None
    assert "missing" in check_arguments("{}", search)
    assert "not valid JSON" in check_arguments("{'query': 1}", search)
    assert "not a JSON object" in check_arguments("[1]", search)
    assert "type integer" in check_arguments('{"query": "a", "k": true}', search)
    strict = {"parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
    assert "unknown argument" in check_arguments('{"x": 1}', strict)


# ---- repeats and the budget ----------------------------------------------------------------------------

def test_repeated_identical_calls_get_a_note_then_a_forced_answer(toolbox):
    def script(prompt, step):
        if prompt[-1]["role"] == "user" and "final answer" in prompt[-1]["content"]:
            return answer_turn("forced")
        args = '{"query": "river"}' if step % 2 else '{ "query":"river" }'  # the same call, spelled differently
        return k2_turn("again", calls=[(f"functions.search:{step - 1}", args)])

    model = ScriptedModel(script)
    result = Agent(model, toolbox, AgentConfig(repeat_warn=3, repeat_stop=5)).run("q")
    assert result.stop_reason == "repeated" and result.answer == "forced" and result.steps == 6
    notes = ["Note: you have made exactly this call" in c for _, c in tool_outputs(result.messages)]
    assert notes == [False, False, True, True, True]
    assert model.tool_choices == ["auto"] * 5 + ["none"]


def test_a_cycle_of_calls_is_caught_like_a_repeat(toolbox):
    """open A, search B, open A, ...: no call repeats in a row, yet the run is a loop."""
    def script(prompt, step):
        if prompt[-1]["role"] == "user" and "final answer" in prompt[-1]["content"]:
            return answer_turn("forced")
        call = ("search", '{"query": "river"}') if step % 2 else ("open", '{"docid": "d0001"}')
        return k2_turn("round", calls=[(f"functions.{call[0]}:{step - 1}", call[1])])

    model = ScriptedModel(script)
    result = Agent(model, toolbox, AgentConfig(repeat_warn=3, repeat_stop=5)).run("q")
    # the search is the odd steps' call: its fifth time is step 9
    assert result.stop_reason == "repeated" and result.answer == "forced" and result.steps == 10
    notes = ["this call 3 times in this run" in c for _, c in tool_outputs(result.messages)]
    assert notes == [False] * 4 + [True] * 2 + [False] * 3
    assert sum("Note: you have made exactly this call" in c for _, c in tool_outputs(result.messages)) == 5


def test_budget_forces_a_final_answer_and_later_calls_are_not_run(toolbox, tmp_path):
    def script(prompt, step):
        content = "Explanation: e\nExact Answer: 42\nConfidence: 60%" if step == 4 else ""
        return k2_turn(f"step {step}", content, [(f"functions.search:{step - 1}", json.dumps({"query": f"q{step}"}))])

    model = ScriptedModel(script)
    result = Agent(model, toolbox, AgentConfig(max_steps=3)).run("q", log_path=tmp_path / "log.jsonl")
    assert result.stop_reason == "budget" and result.steps == 4
    assert result.answer == "42" and result.confidence == 60
    assert len(tool_outputs(result.messages)) == 3 and result.tool_calls == 3
    assert "used all your tool steps" in model.prompts[-1][-1]["content"]
    assert "tool_calls" not in result.messages[-1]  # the call made after the budget is not in the conversation
    last = read_log(tmp_path / "log.jsonl")[-2]
    assert last["ignored_tool_calls"][0]["id"] == "functions.search:3"


# ---- the context ---------------------------------------------------------------------------------------

def test_overflow_hides_old_outputs_then_keeps_last_steps(toolbox):
    """Outputs of 3000 characters against a 9000-character context: K2's hiding first, then fewer steps."""
    big = UnrulyTools(toolbox)
    big.call = lambda name, arguments: f"{arguments}:" + "y" * 3000
    reasoning = "r" * 700

    def script(prompt, step):
        return answer_turn("z") if step == 12 else \
            k2_turn(reasoning, calls=[(f"functions.flood:{step - 1}", json.dumps({"n": step}))])

    model = ScriptedModel(script, context_tokens=9000, max_tokens=1000)
    agent = Agent(model, big, AgentConfig(keep_last_steps=3))
    result = agent.run("q")
    assert result.stop_reason == "final" and result.steps == 12
    limit = agent.context_limit()
    assert limit == 8000
    assert max(model.prompt_tokens) <= limit
    hidden = [p for p in model.prompts if any(m.get("content") == PLACEHOLDER for m in p)]
    assert hidden, "old outputs were hidden"
    for p in hidden:  # the newest output, not read yet, is always shown in full
        assert p[-1]["role"] == "tool" and p[-1]["content"].endswith("y" * 3000)
    assistants = [sum(m["role"] == "assistant" for m in p) for p in model.prompts]
    assert any(n < step for step, n in enumerate(assistants)), "late prompts keep only the last steps"
    assert min(assistants[4:]) >= 1  # never fewer than the last step
    # the conversation itself keeps every output in full
    assert all(c.endswith("y" * 3000) for _, c in tool_outputs(result.messages))


def test_fit_context_cuts_outputs_last_and_gives_up_on_a_huge_question():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "a"}]},
                {"role": "tool", "tool_call_id": "a", "content": "o" * 500}]
    count = lambda ms: sum(len(m.get("content") or "") for m in ms)  # noqa: E731
    view, tokens, hidden_before, action = fit_context(messages, count, 200, 0, 1, 4)
    assert tokens <= 200 and view[-1]["content"].startswith("o" * 100) and "cut" in view[-1]["content"]
    assert "cut to" in action
    assert fit_context([{"role": "user", "content": "q" * 300}], count, 200, 0, 1, 4) is None


def test_a_question_that_cannot_fit_ends_the_run_cleanly(toolbox, tmp_path):
    model = ScriptedModel([answer_turn("never")], context_tokens=1500)
    result = Agent(model, toolbox).run("q" * 5000, log_path=tmp_path / "log.jsonl")
    assert result.stop_reason == "context" and result.steps == 0 and model.prompts == []
    assert read_log(tmp_path / "log.jsonl")[-1]["stop_reason"] == "context"


# ---- the log and the view ------------------------------------------------------------------------------

def test_log_is_written_step_by_step_and_survives_a_failing_backend(toolbox, tmp_path):
    log = tmp_path / "run.jsonl"
    seen = {}

    def script(prompt, step):
        if step == 3:
            seen["log"] = read_log(log)  # while the run is going on
            raise ConnectionError("server went away")
        return k2_turn(f"s{step}", calls=[(f"functions.search:{step - 1}", json.dumps({"query": f"w{step}"}))])

    result = Agent(ScriptedModel(script), toolbox).run("q", log_path=log)
    assert [r["kind"] for r in seen["log"]] == ["start", "step", "step"]
    assert result.stop_reason == "backend_error" and "server went away" in result.error and result.steps == 2
    records = read_log(log)
    assert [r["kind"] for r in records] == ["start", "step", "step", "final"]
    assert records[-1]["error"] == result.error
    assert set(records[1]) >= {"step", "reasoning", "content", "tool_calls", "results", "prompt_tokens",
                               "completion_tokens", "cached_tokens", "seconds", "errors"}


def test_ctrl_c_propagates_and_the_log_says_so(toolbox, tmp_path):
    def script(prompt, step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Agent(ScriptedModel(script), toolbox).run("q", log_path=tmp_path / "log.jsonl")
    assert read_log(tmp_path / "log.jsonl")[-1]["stop_reason"] == "interrupted"


def test_terminal_view_shows_thinking_calls_results_and_tokens(toolbox):
    import io
    out = io.StringIO()
    model = ScriptedModel([k2_turn("let me think\nstill", calls=[("functions.search:0", '{"query": "river"}')]),
                           answer_turn("x")])
    Agent(model, toolbox, view=TerminalView(out, color=False)).run("Which river?")
    text = out.getvalue()
    assert "question: Which river?" in text and "── step 1/300" in text and "── step 2/300" in text
    assert "  │ let me think\n  │ still" in text
    assert '  → search({"query": "river"})' in text and "  ← " in text
    assert "tokens:" in text and "answer: x · confidence 90%" in text


# ---- answers and scoring -------------------------------------------------------------------------------

def test_answers_are_extracted_and_normalised():
    assert extract_answer("Explanation: a\nExact Answer: 1,850.\nConfidence: 85%") == ("1,850.", 85.0)
    assert extract_answer("no format") == (None, None)
    assert answer_key("**Ada Lovelace**") == answer_key("ada lovelace") == "ada lovelace"
    assert is_correct("1,850.", "1850") and is_correct('"Nile"', "nile") and not is_correct(None, "x")
    rows = [{"correct": True, "answer": "a", "steps": 3, "tool_calls": 2, "valid_tool_calls": 2, "gold_tool_calls": 2,
             "prompt_tokens": 10, "cached_tokens": 5, "completion_tokens": 3, "seconds": 1.0, "stop_reason": "final"},
            {"correct": False, "answer": None, "steps": 1, "tool_calls": 2, "valid_tool_calls": 1, "gold_tool_calls": 2,
             "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 3, "seconds": 1.0, "stop_reason": "budget"}]
    s = summarize(rows)
    assert (s["accuracy"], s["completed"], s["mean_tool_calls"], s["valid_tool_call_rate"]) == (0.5, 0.5, 2.0, 0.75)


def test_eval_counts_the_gold_documents_a_run_opened_in_order():
    def turn(*calls):
        return {"role": "assistant", "tool_calls": [
            {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(calls)]}
    messages = [{"role": "user", "content": "q"},
                turn(("open", '{"docid": "d0001"}'), ("search", '{"query": "d0002"}')),
                {"role": "tool", "tool_call_id": "functions.open:0", "content": "..."},
                turn(("open", '{"docid": "d0009"}')),          # a wrong note: the count does not end here
                turn(("open", "{not json")), turn(("open", {"docid": " d0002 "})),
                turn(("open", '{"docid": "d0004"}'))]           # skips d0003: the count stops at 2
    assert opened_docids(messages) == ["d0001", "d0009", "d0002", "d0004"]
    chain = evidence_chain([{"docid": d} for d in ["d0001", "d0002", "d0002", "d0003", "d0004"]])
    assert chain == ["d0001", "d0002", "d0003", "d0004"]
    assert evidence_followed(chain, opened_docids(messages)) == 2
    assert evidence_followed(chain, []) == 0 and evidence_followed(chain, chain + ["d0005"]) == 4
    base = {"answer": None, "steps": 1, "tool_calls": 1, "valid_tool_calls": 1, "gold_tool_calls": 4, "prompt_tokens": 1,
            "cached_tokens": 0, "completion_tokens": 1, "seconds": 1.0, "stop_reason": "budget", "correct": False}
    s = summarize([{**base, "evidence_docs": 4, "evidence_followed": 2}, {**base, "evidence_docs": 4, "evidence_followed": 4},
                   {**base, "evidence_docs": 2, "evidence_followed": 0}])
    assert s["evidence_followed"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert (s["median_evidence_followed"], s["median_evidence_docs"]) == (2, 4)


def test_eval_counts_the_gold_sentences_a_run_quoted_and_where_wrong_runs_fell_short():
    ev = [{"docid": "d1", "text": "A worked for B."}, {"docid": "d2", "text": "B was founded in 1801."},
          {"docid": "d2", "text": "B was founded in 1801."}]                  # one sentence named twice counts once
    messages = [{"role": "user", "content": "A worked for B. B was founded in 1801."},   # the question's words
                {"role": "assistant", "reasoning_content": 'The article says: "A worked for B." So ...'},
                {"role": "tool", "content": "B was founded in 1801."},                  # read, not written
                {"role": "assistant", "content": "Exact Answer: 1802"}]
    assert evidence_quoted(ev, messages) == 1
    messages.append({"role": "assistant", "content": "Explanation: B was founded in 1801.\nExact Answer: 1801"})
    assert evidence_quoted(ev, messages) == 2
    def opening(*docids):
        return {"role": "assistant", "tool_calls": [{"id": f"functions.open:{i}", "type": "function", "function": {
            "name": "open", "arguments": json.dumps({"docid": d})}} for i, d in enumerate(docids)]}
    hop1 = {"role": "assistant", "reasoning_content": 'The article says: "A worked for B."'}
    assert first_miss(ev, [opening("d1", "d2"), hop1], quoting=True) == "not_quoted"     # the second sentence
    assert first_miss(ev, [opening("d1"), hop1], quoting=True) == "not_opened"
    # a wrong sentence at the first hop, so the second page was never opened: the quote is what was missed
    assert first_miss(ev, [opening("d1"), {"role": "assistant", "content": "A was born in C."}], True) == "not_quoted"
    assert first_miss(ev, [opening("d1", "d2")], quoting=False) is None                 # trails: pages only
    assert first_miss(ev, messages + [opening("d2", "d1")], quoting=True) is None
    row = {"answer": "x", "correct": False, "evidence_docs": 2, "evidence_followed": 2, "evidence_sentences": 2,
           "evidence_quoted": 1}
    assert where_wrong({**row, "answer": None, "first_miss": "not_opened"}) == "no_answer"
    assert where_wrong({**row, "first_miss": "not_opened"}) == "not_opened"
    assert where_wrong({**row, "first_miss": "not_quoted"}) == "not_quoted"
    assert where_wrong({**row, "first_miss": None}) == "quoted_all"
    trail = {k: v for k, v in row.items() if k not in ("evidence_sentences", "evidence_quoted")}
    assert where_wrong({**trail, "first_miss": None}) == "opened_all"                  # trails are not scored on quotes
    base = {"steps": 1, "tool_calls": 1, "valid_tool_calls": 1, "gold_tool_calls": 4, "prompt_tokens": 1,
            "cached_tokens": 0, "completion_tokens": 1, "seconds": 1.0, "stop_reason": "final"}
    s = summarize([{**base, **row, "first_miss": "not_quoted"},
                   {**base, **row, "evidence_quoted": 2, "first_miss": None},
                   {**base, **row, "evidence_quoted": 2, "first_miss": None, "correct": True}])
    assert s["evidence_quoted"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert s["wrong"] == {"not_quoted": 1, "quoted_all": 1}


def test_the_gold_of_quoting_families_writes_every_evidence_sentence():
    """`evidence_quoted` scores a run against what the gold agent does: quote each evidence sentence."""
    from nanok2.world import Toolbox, build_world, make_tasks
    from nanok2.world.tasks import GOLD_STYLES

    world = build_world(1001, 600)
    toolbox = Toolbox(world.corpus)
    for family in QUOTING_FAMILIES:
        for style in GOLD_STYLES:
            for task in make_tasks(world, toolbox, family, None, 3, style):
                assert evidence_quoted(task.evidence, task.messages) == len({e["text"] for e in task.evidence})
    trail = make_tasks(world, toolbox, "trail", 3, 1)[0]
    assert evidence_quoted(trail.evidence, trail.messages) == 0       # it names the next docid instead


# ---- OpenAI-compatible servers -------------------------------------------------------------------------

def test_openai_message_conversion():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "reasoning": "think", "errors": [{"kind": "x"}],
                 "tool_calls": [{"id": "functions.search:0", "type": "function",
                                 "function": {"name": "search", "arguments": {"query": "a"}}}]},
                {"role": "tool", "tool_call_id": "functions.search:0", "content": "out"},
                {"role": "assistant", "content": "done", "reasoning_content": "", "tool_calls": []}]
    sent = to_openai_messages(messages)
    assert sent[1] == {"role": "assistant", "content": None, "reasoning_content": "think",
                       "tool_calls": [{"id": "functions.search:0", "type": "function",
                                       "function": {"name": "search", "arguments": '{"query": "a"}'}}]}
    assert sent[2] == messages[2] and sent[3] == {"role": "assistant", "content": "done"}

    from nanok2.sampling import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=64, seed=3, stop=["END"], top_k=20)
    req = openai_request("kimi", messages, [{"type": "function"}], params, "none")
    assert req["tool_choice"] == "none" and req["extra_body"] == {"top_k": 20} and req["seed"] == 3
    reply = from_openai({"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "reasoning": "r",
        "tool_calls": [{"id": "functions.open:7", "type": "function",
                        "function": {"name": "open", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 8}}})
    assert reply["reasoning_content"] == "r" and reply["tool_calls"][0]["id"] == "functions.open:7"
    assert reply["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "cached_tokens": 8}


def test_openai_backend_through_the_real_client(toolbox):
    """A local stand-in server answers with canned completions; the official client and the loop do the rest."""
    pytest.importorskip("openai")
    def completion(message, finish):
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "kimi",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110,
                          "prompt_tokens_details": {"cached_tokens": 60}}}
    replies = [completion({"role": "assistant", "content": None, "reasoning_content": "I search first.",
                           "tool_calls": [{"id": "functions.search:0", "type": "function",
                                           "function": {"name": "search", "arguments": '{"query": "river"}'}}]},
                          "tool_calls"),
               completion({"role": "assistant", "reasoning": "Found.",
                           "content": "Explanation: e\nExact Answer: Nile\nConfidence: 70%"}, "stop")]
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps(replies[len(requests) - 1]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_port}/v1", "kimi", api_key="k")
        result = Agent(backend, toolbox).run("Which river?", SYSTEM_PROMPT)
    finally:
        server.shutdown()
    assert result.answer == "Nile" and result.stop_reason == "final" and result.cached_tokens == 120
    assert requests[0]["tools"] == toolbox.schemas and requests[0]["tool_choice"] == "auto"
    second = requests[1]["messages"]
    assert second[2] == {"role": "assistant", "content": None, "reasoning_content": "I search first.",
                         "tool_calls": [{"id": "functions.search:0", "type": "function",
                                         "function": {"name": "search", "arguments": '{"query": "river"}'}}]}
    assert second[3] == {"role": "tool", "tool_call_id": "functions.search:0",
                         "content": toolbox.call("search", {"query": "river"})}


# ---- the Engine, end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny model with a byte-level tokenizer (512 ids, as the preset's vocabulary)."""
    from nanok2 import ModelArgs, build_model, save_model
    from nanok2.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("agent-model")
    save_model(build_model(ModelArgs.from_preset("tiny"), seed=3), path)
    Tokenizer({bytes([i]): i for i in range(256)}).save(path)
    return path


def test_engine_backend_survives_a_random_model(world, toolbox, tiny_checkpoint, tmp_path):
    from nanok2 import load_model
    from nanok2.agent_backends import EngineBackend
    from nanok2.engine import Engine
    from nanok2.sampling import SamplingParams
    from nanok2.tokenizer import Tokenizer

    engine = Engine(load_model(tiny_checkpoint), Tokenizer.load(tiny_checkpoint), max_batch=1, max_seq=2048)
    backend = EngineBackend(engine, SamplingParams(temperature=1.0, max_tokens=16, seed=0))
    question = make_tasks(world, toolbox, "trail", 2, 1)[0].question
    result = Agent(backend, toolbox, AgentConfig(max_steps=2)).run(question, SYSTEM_PROMPT, tmp_path / "log.jsonl")
    assert result.steps >= 1 and result.stop_reason in ("final", "budget", "repeated", "stalled", "context")
    records = read_log(tmp_path / "log.jsonl")
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "final"
    first = records[1]
    # the loop measures prompts exactly as the engine reads them
    assert first["prompt_tokens"] == backend.count_tokens(result.messages[:2], toolbox.schemas)
    assert 1 <= first["completion_tokens"] <= 16
    # a context too small for the question ends the run before the engine is asked
    small = Engine(engine.model, engine.tokenizer, max_batch=1, max_seq=512)
    tight = Agent(EngineBackend(small, SamplingParams(max_tokens=24, seed=0)), toolbox).run(question, SYSTEM_PROMPT)
    assert tight.stop_reason == "context" and tight.steps == 0


# ---- the commands --------------------------------------------------------------------------------------

def test_agent_command_without_the_embedded_model_says_what_to_do(capsys, tmp_path, monkeypatch):
    import nanok2.agent_cli as agent_cli

    gone = tmp_path / "models" / "nanok2-agent-tiny"          # a clone whose embedded model was deleted
    monkeypatch.setattr(agent_cli, "DEFAULT_MODEL", gone)
    assert main(["agent", "What is it?", "--model", str(gone), "--log", str(tmp_path / "l.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "embedded agent model is not there" in err and "--model PATH" in err
    assert main(["agent", "q", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_readme_first_command_runs_on_the_embedded_model(tmp_path, capsys):
    """`nanok2 agent "QUESTION"` with nothing else: the committed INT4 checkpoint on world 0."""
    from nanok2.agent_cli import DEFAULT_MODEL
    from nanok2.checkpoint import load_model

    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"        # K2-Thinking's INT4 layout
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir()) <= 25e6
    assert load_model(DEFAULT_MODEL).args.max_position_embeddings == 2048
    log = tmp_path / "run.jsonl"
    assert main(["agent", "In what year was the author of Vrunsekar in Winter born?", "--max-steps", "3",
                 "--log", str(log)]) == 0
    out = capsys.readouterr().out
    records = read_log(log)
    assert records[0]["question"].startswith("In what year") and records[-1]["kind"] == "final"
    steps = [r for r in records if r.get("kind") == "step"]
    assert steps and all(f"── step {r['step']}/3" in out for r in steps)      # the live view showed each step
    assert "stop: " in out and "log: " in out


def test_agent_documents_from_a_seed_a_saved_world_or_a_folder(tmp_path):
    import argparse

    from nanok2.agent_cli import _documents
    from nanok2.errors import NanoK2Error
    from nanok2.world import save_world

    def docs(**kw):
        return _documents(argparse.Namespace(**{"corpus": None, "world": "0", "size": 300, **kw}))

    corpus, world = docs(world="4")
    assert world.seed == 4 and len(corpus.docs) == 300
    save_world(world, tmp_path / "w")
    assert docs(world=str(tmp_path / "w"))[1].fingerprint == world.fingerprint
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("The lighthouse keeper logs the weather.")
    corpus, world = docs(corpus=tmp_path / "mine")
    assert world is None and corpus.docs[0].title == "notes.md"
    with pytest.raises(NanoK2Error, match="neither a seed"):
        docs(world="nowhere")


def test_eval_world_and_agent_commands_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    common = ["--model", str(tiny_checkpoint), "--max-tokens", "8", "--sample-seed", "0", "--context", "2048"]
    assert main(["eval", "world", "--seed", "1000", "--size", "300", "--family", "trail", "--hops", "1", "--n", "2",
                 "--json", "--log-dir", str(tmp_path / "logs"), *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows, summary = [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])
    assert len(rows) == 2 and {"accuracy", "completed", "mean_tool_calls", "valid_tool_call_rate"} <= set(summary)
    assert summary["n"] == 2 and summary["family"] == "trail" and summary["prompt_tokens"] > 0
    assert all(r["evidence_docs"] == 1 and 0 <= r["evidence_followed"] <= 1 for r in rows)
    assert 0 <= summary["evidence_followed"] <= 1 and summary["median_evidence_docs"] == 1
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["task-000.jsonl", "task-001.jsonl"]
    # --worlds: n tasks from each of K worlds (independent long trails), numbered on
    assert main(["eval", "world", "--seed", "1000", "--worlds", "2", "--size", "300", "--family", "trail", "--hops", "1",
                 "--n", "1", "--json", "--log-dir", str(tmp_path / "logs2"), *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows, summary = [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])
    assert [(r["task"], r["seed"]) for r in rows] == [(0, 1000), (1, 1001)]
    assert summary["n"] == 2 and summary["worlds"] == 2 and summary["seed"] == 1000
    assert sorted(p.name for p in (tmp_path / "logs2").iterdir()) == ["task-000.jsonl", "task-001.jsonl"]
    # the readable report: per task and in all, the gold sentences quoted and where the wrong runs fell short
    assert main(["eval", "world", "--seed", "1000", "--size", "300", "--family", "multihop", "--n", "1",
                 "--max-steps", "4", *common]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sentences quoted \d/2", out) and re.search(r"gold sentences quoted \d+%", out)
    summary = json.loads(out.strip().splitlines()[-1])
    assert "wrong runs: none" in out if summary["accuracy"] == 1 else sum(summary["wrong"].values()) == 1
    assert main(["eval", "world", "--worlds", "0", "--family", "trail", *common]) == 2
    assert "--worlds 0: evaluate on at least one world" in capsys.readouterr().err
    assert main(["agent", "--task", "trail", "--hops", "1", "--world", "1000", "--size", "300", "--quiet",
                 "--log", str(tmp_path / "run.jsonl"), *common]) == 0
    out = capsys.readouterr().out
    assert "gold answer:" in out and read_log(tmp_path / "run.jsonl")[-1]["kind"] == "final"
