"""Scoring the agent on generated world tasks: exact answers, steps, tool calls and their validity, tokens, time.

A small model's agentic skill can be measured where every answer is known and unique: the tasks of a
world generated from a seed the model was not trained on (nanok2/world/tasks.py). Accuracy is over all
tasks, a run that ends without an answer counting as wrong, as HLE and BrowseComp count missing answers
(docs/protocols.md); its 95% half-width is given beside it.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

from nanok2.world.trajectories import normalize_answer

# the families whose gold thinking quotes every evidence sentence word for word (a trail's names the next
# docid instead); a test checks it on the gold trajectories
QUOTING_FAMILIES = ("multihop", "constraint", "arithmetic")

# What a model may wrap an answer in that does not change it: quotes, markdown emphasis, end punctuation.
_WRAPPING = " \t\n\"'`*_.,;:!?"


def answer_key(text: str) -> str:
    """An answer normalised for exact matching: the world's rule (case, spaces, a final period, digit-group
    commas) after stripping quotes, emphasis and punctuation around it, casefolded."""
    return normalize_answer(text.strip(_WRAPPING)).casefold()


def is_correct(answer: str | None, gold: str) -> bool:
    return answer is not None and answer_key(answer) == answer_key(gold)


def opened_docids(messages: list[dict]) -> list[str]:
    """The docids a run's `open` calls asked for, in order (calls whose arguments do not parse are skipped)."""
    out = []
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            if fn.get("name") != "open":
                continue
            args = fn.get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                continue
            if isinstance(args, dict) and isinstance(args.get("docid"), str):
                out.append(args["docid"].strip())
    return out


def evidence_chain(evidence: list[dict]) -> list[str]:
    """A task's gold evidence documents in order, a document named twice in a row once (two facts of one
    article are one `open`)."""
    docids = [e["docid"] for e in evidence]
    return [d for i, d in enumerate(docids) if i == 0 or d != docids[i - 1]]


def evidence_followed(chain: list[str], opened: list[str]) -> int:
    """How many of the gold documents `chain`, from the first, a run opened in that order (a wrong document
    in between does not end the count; opening the right one after it continues it). On a trail: the notes
    followed."""
    n = 0
    for docid in opened:
        if n < len(chain) and docid == chain[n]:
            n += 1
    return n


def _written(messages: list[dict]) -> str:
    """All the run's own text: the thinking and the replies of its assistant turns."""
    return "\n".join(str(m.get(key) or "") for m in messages if m.get("role") == "assistant"
                     for key in ("reasoning_content", "content"))


def evidence_quoted(evidence: list[dict], messages: list[dict]) -> int:
    """How many of a task's gold evidence sentences the run's own turns (thinking or reply) write word for
    word: a run can open the right page and still take its fact from the wrong sentence. Verbatim, as this
    project's gold thinking quotes (`The article says: "..."`); a model that paraphrases scores 0 here."""
    written = _written(messages)
    return sum(text in written for text in dict.fromkeys(e["text"] for e in evidence))


def first_miss(evidence: list[dict], messages: list[dict], quoting: bool) -> str | None:
    """The first gold step, along the evidence, that the run did not take: "not_opened" (the sentence's
    document never opened) or "not_quoted" (opened, its sentence not written word for word; checked only
    when `quoting`). A wrong sentence taken at the first hop sends the run to the wrong second page, so the
    order matters: that run missed a quote, not a page. None when every step was taken."""
    opened, written = set(opened_docids(messages)), _written(messages)
    for e in evidence:
        if e["docid"] not in opened:
            return "not_opened"
        if quoting and e["text"] not in written:
            return "not_quoted"
    return None


def where_wrong(row: dict) -> str:
    """Where a wrong run fell short: no answer, else its first missed gold step (first_miss), else the
    answer is wrong though every gold sentence was quoted (on trails, whose thinking names the next docid
    instead of quoting: every note opened)."""
    if row["answer"] is None:
        return "no_answer"
    return row["first_miss"] or ("quoted_all" if "evidence_quoted" in row else "opened_all")


def evaluate(agent, tasks: list, system_prompt: str | None, log_dir: str | Path | None = None,
             on_task=None, first: int = 0) -> list[dict]:
    """Run `agent` on each task; -> one row per task, numbered from `first`. `on_task(row)` is called as
    each one ends, and each run's trajectory goes to `log_dir/task-NNN.jsonl` when a folder is given."""
    rows = []
    for i, task in enumerate(tasks, start=first):
        log = Path(log_dir) / f"task-{i:03d}.jsonl" if log_dir else None
        result = agent.run(task.question, system_prompt=system_prompt, log_path=log)
        chain = evidence_chain(task.evidence)
        row = {"task": i, "family": task.family, "hops": task.hops, "question": task.question, "gold": task.answer,
               "answer": result.answer, "correct": is_correct(result.answer, task.answer),
               "gold_tool_calls": sum(len(m.get("tool_calls") or []) for m in task.messages),
               "evidence_docs": len(chain), "evidence_followed": evidence_followed(chain, opened_docids(result.messages)),
               **({"evidence_sentences": len({e["text"] for e in task.evidence}),
                   "evidence_quoted": evidence_quoted(task.evidence, result.messages)}
                  if task.family in QUOTING_FAMILIES else {}),
               "first_miss": first_miss(task.evidence, result.messages, task.family in QUOTING_FAMILIES),
               **{k: v for k, v in result.summary().items() if k not in ("question", "answer", "content")}}
        rows.append(row)
        on_task and on_task(row)
    return rows


def summarize(rows: list[dict], seconds: float | None = None) -> dict:
    """The figures of an eval: accuracy (over all tasks), its 95% half-width, the share of runs that
    ended with an answer (`completed`), steps and tool calls per task, the share of well-formed calls
    (None when no call was made), the gold evidence documents opened in order (`evidence_followed`: the
    mean share; its median count beside the median count there was to open), the gold sentences written
    word for word (`evidence_quoted`: the mean share), where the wrong runs fell short (`wrong`: where_wrong),
    token totals and time."""
    n = len(rows)
    if n == 0:
        return {"n": 0, "accuracy": 0.0, "completed": 0.0, "mean_tool_calls": 0.0, "valid_tool_call_rate": None}
    acc = sum(r["correct"] for r in rows) / n
    calls = sum(r["tool_calls"] for r in rows)
    return {
        "n": n,
        "accuracy": acc,
        "ci95": 1.96 * math.sqrt(acc * (1 - acc) / n),
        "completed": sum(r["answer"] is not None for r in rows) / n,
        "mean_steps": sum(r["steps"] for r in rows) / n,
        "mean_tool_calls": calls / n,
        "valid_tool_call_rate": sum(r["valid_tool_calls"] for r in rows) / calls if calls else None,
        "mean_gold_tool_calls": sum(r["gold_tool_calls"] for r in rows) / n,
        **({"evidence_followed": sum(r["evidence_followed"] / max(r["evidence_docs"], 1) for r in rows) / n,
            "median_evidence_followed": statistics.median(r["evidence_followed"] for r in rows),
            "median_evidence_docs": statistics.median(r["evidence_docs"] for r in rows)}
           if all("evidence_docs" in r for r in rows) else {}),
        **({"evidence_quoted": sum(r["evidence_quoted"] / max(r["evidence_sentences"], 1) for r in rows) / n}
           if all("evidence_quoted" in r for r in rows) else {}),
        **({"wrong": dict(Counter(where_wrong(r) for r in rows if not r["correct"]))}
           if all("first_miss" in r for r in rows) else {}),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "cached_tokens": sum(r["cached_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "mean_seconds": sum(r["seconds"] for r in rows) / n,
        "seconds": seconds if seconds is not None else sum(r["seconds"] for r in rows),
        "stop_reasons": dict(Counter(r["stop_reason"] for r in rows)),
    }

