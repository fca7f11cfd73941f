"""Scoring the agent on generated world tasks: exact answers, steps, tool calls and their validity, tokens, time.

A small model's agentic skill can be measured where every answer is known and unique: the tasks of a
world generated from a seed the model was not trained on (nanok2/world/tasks.py). Accuracy is over all
tasks, a run that ends without an answer counting as wrong, as HLE and BrowseComp count missing answers
(docs/protocols.md); its 95% half-width is given beside it.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from nanok2.world.trajectories import normalize_answer

# What a model may wrap an answer in that does not change it: quotes, markdown emphasis, end punctuation.
_WRAPPING = " \t\n\"'`*_.,;:!?"


def answer_key(text: str) -> str:
    """An answer normalised for exact matching: the world's rule (case, spaces, a final period, digit-group
    commas) after stripping quotes, emphasis and punctuation around it, casefolded."""
    return normalize_answer(text.strip(_WRAPPING)).casefold()


def is_correct(answer: str | None, gold: str) -> bool:
    return answer is not None and answer_key(answer) == answer_key(gold)


def evaluate(agent, tasks: list, system_prompt: str | None, log_dir: str | Path | None = None,
             on_task=None, first: int = 0) -> list[dict]:
    """Run `agent` on each task; -> one row per task, numbered from `first`. `on_task(row)` is called as
    each one ends, and each run's trajectory goes to `log_dir/task-NNN.jsonl` when a folder is given."""
    rows = []
    for i, task in enumerate(tasks, start=first):
        log = Path(log_dir) / f"task-{i:03d}.jsonl" if log_dir else None
        result = agent.run(task.question, system_prompt=system_prompt, log_path=log)
        row = {"task": i, "family": task.family, "hops": task.hops, "question": task.question, "gold": task.answer,
               "answer": result.answer, "correct": is_correct(result.answer, task.answer),
               "gold_tool_calls": sum(len(m.get("tool_calls") or []) for m in task.messages),
               **{k: v for k, v in result.summary().items() if k not in ("question", "answer", "content")}}
        rows.append(row)
        on_task and on_task(row)
    return rows


def summarize(rows: list[dict], seconds: float | None = None) -> dict:
    """The figures of an eval: accuracy (over all tasks), its 95% half-width, the share of runs that
    ended with an answer (`completed`), steps and tool calls per task, the share of well-formed calls
    (None when no call was made), token totals and time."""
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
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "cached_tokens": sum(r["cached_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "mean_seconds": sum(r["seconds"] for r in rows) / n,
        "seconds": seconds if seconds is not None else sum(r["seconds"] for r in rows),
        "stop_reasons": dict(Counter(r["stop_reason"] for r in rows)),
    }

