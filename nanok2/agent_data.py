"""Training conversations for an agent model: gold trajectories cut into the contexts the agent loop shows.

A gold trajectory (nanok2/world/tasks.py) is the whole conversation. The agent loop never shows a small
model the whole of a long one: before each step it fits the conversation into the context with
`agent.fit_context` (K2's "hide all previous tool outputs", then "keep the last K steps"). A model
trained on whole conversations would meet contexts at run time that it never saw, so each assistant turn
is trained in exactly the view the loop would give it at that step, using the same function and the same
token count. Consecutive turns whose views extend each other share one example; `train_from` says which
assistant messages of an example are trained (the earlier ones were trained in their own views).

A run that exhausts its step budget gets a user message asking for the final answer (agent.FORCE_ANSWER);
a share of the examples end that way, so that the model answers from what it has read.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from nanok2.agent import FORCE_ANSWER, FORCE_TAIL, AgentConfig, fit_context
from nanok2.chat import render_ids
from nanok2.errors import NanoK2Error


@dataclass
class Example:
    messages: list[dict]   # the view, ending with the last trained assistant message
    train_from: int        # assistant messages at this index and after are trained

    def to_json(self, tools: list[dict]) -> dict:
        return {"messages": self.messages, "tools": tools, "train_from": self.train_from}


def prompt_limit(context: int, reply_tokens: int) -> int:
    """Prompt tokens the agent loop allows (agent.Agent.context_limit): the context less one reply."""
    return context - min(reply_tokens, context // 2)


def agent_views(messages: list[dict], count, limit: int, config: AgentConfig | None = None) -> list[Example]:
    """The examples that train every assistant turn of `messages` in the view the agent loop gives it.

    `count(view) -> tokens` must be the backend's count (the rendered prompt with the generation prompt).
    """
    config = config or AgentConfig()
    examples: list[Example] = []
    open_example, consumed, hidden_before = None, 0, 0   # consumed: gold messages the open example covers
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        fitted = fit_context(messages[:i], count, limit, hidden_before, config.hide_keep_last,
                             config.keep_last_steps)
        if fitted is None:
            raise NanoK2Error(f"the question alone does not fit in {limit} prompt tokens")
        view, _, hidden_before, _ = fitted
        if open_example is not None and view == open_example.messages + messages[consumed:i]:
            open_example.messages = view + [m]          # the same context, grown by one step
        else:
            if open_example is not None:
                examples.append(open_example)
            open_example = Example(view + [m], train_from=len(view))
        consumed = i + 1
    if open_example is not None:
        examples.append(open_example)
    return examples


def forced_ending(messages: list[dict], reason: str = "budget") -> list[dict]:
    """The gold conversation as a run whose budget ran out right before its final answer: the loop's
    user message asking for the answer, then the same final message."""
    if not messages or messages[-1].get("role") != "assistant" or messages[-1].get("tool_calls"):
        raise NanoK2Error("a forced ending needs a conversation that ends with its final answer")
    return messages[:-1] + [{"role": "user", "content": FORCE_ANSWER[reason] + FORCE_TAIL}, messages[-1]]


def check_loss_weights(weights) -> None:
    """SFT's integer loss weights (assistant's turns, tools' results): they are stored in a uint8 mask."""
    if not (isinstance(weights, (list, tuple)) and len(weights) == 2 and all(isinstance(w, int) for w in weights)
            and 0 < weights[0] < 256 and 0 <= weights[1] < 256):
        raise NanoK2Error(f"loss weights {weights!r}: need [assistant 1-255, tool results 0-255], integers")


def encode_example(row: dict, tokenizer, weights: tuple[int, int] = (1, 0)) -> tuple[list[int], list[int]]:
    """An SFT row {"messages", "tools", optional "train_from"} -> (ids, loss mask).

    Without `train_from` every assistant turn of the current tool loop is trained (chat.render_ids); with
    it, only the assistant messages from that index on: the mask is cleared over the rendered prompt
    of the messages before it, which must be a prefix of the whole rendering. `weights` are the mask's
    integer loss weights (0-255) of (the assistant's trained turns, the tools' results).
    """
    messages, tools = row["messages"], row.get("tools")
    check_loss_weights(weights)
    ids, mask = render_ids(messages, tokenizer, tools, assistant=weights[0], tool_results=weights[1])
    start = row.get("train_from")
    if start:
        if not 0 < start < len(messages) or messages[start].get("role") != "assistant":
            raise NanoK2Error(f"train_from={start} does not point at an assistant message")
        prefix, _ = render_ids(messages[:start], tokenizer, tools, add_generation_prompt=True)
        if ids[:len(prefix)] != prefix:
            raise NanoK2Error(f"train_from={start}: the prompt before it does not render as a prefix")
        mask = [0] * len(prefix) + mask[len(prefix):]
    return ids, mask


@dataclass
class TaskMix:
    """How many tasks of each family and difficulty to draw from one training world."""
    multihop: dict = field(default_factory=lambda: {1: 4, 2: 8, 3: 6, 4: 3})
    constraint: dict = field(default_factory=lambda: {2: 4, 3: 6, 4: 3})
    arithmetic: dict = field(default_factory=lambda: {2: 3, 3: 2})
    trail_short: int = 6          # trails of 1-12 notes
    trail_medium: int = 2         # 13-60 notes: they reach the keep-last-K regime
    trail_long: int = 2           # 61-300 notes: tool-call indices as high as a 300-step run's
    forced_share: float = 0.25    # trails that end with the budget's forced-answer message
    long_views: int = 6           # single-step views kept per long trail (they all look alike)


def longest_reply(messages: list[dict], turn_tokens) -> int:
    """Tokens of the longest assistant turn of `messages`; `turn_tokens(messages[:i + 1])` counts the turn that
    ends them as the model generates it (agent_backends.reply_tokens)."""
    return max((turn_tokens(messages[:i + 1]) for i, m in enumerate(messages) if m.get("role") == "assistant"),
               default=0)


def world_examples(world, toolbox, count, limit: int, mix: TaskMix, rng: random.Random,
                   config: AgentConfig | None = None, style: str = "plain",
                   reply_limit: int | None = None, turn_tokens=None) -> tuple[list[Example], dict]:
    """Examples from one world's tasks, their gold thinking worded in `style` (world/tasks.py GOLD_STYLES);
    -> (examples, {family: tasks used}). With `reply_limit`, a question task with a gold turn longer than
    that (counted by `turn_tokens`, see longest_reply) is left out (the agent could not write it within one
    reply) and counted as "over_reply_limit"."""
    from nanok2.world.tasks import make_tasks, make_trail

    if reply_limit is not None and turn_tokens is None:
        raise NanoK2Error("reply_limit needs turn_tokens, the count of one generated turn")
    examples, used = [], {}
    for family in ("multihop", "constraint", "arithmetic"):
        for hops, n in getattr(mix, family).items():
            try:
                tasks = make_tasks(world, toolbox, family, hops, n, style)
            except NanoK2Error:    # a small world may not hold n distinct tasks of this kind
                continue
            if reply_limit is not None:
                fit = [t for t in tasks if longest_reply(t.messages, turn_tokens) <= reply_limit]
                if len(fit) < len(tasks):
                    used["over_reply_limit"] = used.get("over_reply_limit", 0) + len(tasks) - len(fit)
                tasks = fit
            for t in tasks:
                examples += agent_views(t.messages, count, limit, config)
            used[family] = used.get(family, 0) + len(tasks)
    depths = sorted(set(world.rendered.trails.depth))
    def draw(low: int, high: int, n: int) -> list[int]:
        return [rng.choice([d for d in depths if low <= d <= high] or depths) for _ in range(n)]

    trail_hops = draw(1, 12, mix.trail_short) + draw(13, 60, mix.trail_medium) + draw(61, 300, mix.trail_long)
    for hops in trail_hops:
        task = make_trail(world, toolbox, hops, rng)
        messages = forced_ending(task.messages) if rng.random() < mix.forced_share else task.messages
        views = agent_views(messages, count, limit, config)
        if len(views) > mix.long_views + 2:
            # the first views (full, then outputs hidden) and the last (the answer) stay; the middle ones,
            # all "question + last K steps", are sampled
            middle = rng.sample(views[1:-1], mix.long_views)
            views = [views[0], *middle, views[-1]]
        examples += views
        used["trail"] = used.get("trail", 0) + 1
    return examples, used


def write_examples(path, examples: list[Example], tools: list[dict]) -> int:
    with open(path, "a", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(tools), ensure_ascii=False) + "\n")
    return len(examples)
