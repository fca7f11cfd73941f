"""`nanok2 generate` and `nanok2 chat`: the engine on the command line, streaming as it decodes.

`generate` continues a raw prompt (special tokens written as text are recognised, so a hand-written
chat-format prompt works). `chat` is an interactive conversation in K2's chat format: the reasoning
streams dimmed under a "thinking" header, the answer after it; each turn re-sends the conversation, and
the engine reuses the cached prefix, so only the new message is prefilled.
"""
from __future__ import annotations

import sys

DIM, RESET = "\033[2m", "\033[0m"


def _load(args):
    import torch

    from nanok2.checkpoint import load_model
    from nanok2.engine import Engine
    from nanok2.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    tokenizer = Tokenizer.load(args.model)
    max_seq = args.max_seq or min(8192, model.args.max_position_embeddings)
    return Engine(model, tokenizer, max_batch=1, max_seq=max_seq, cpu_kernels=True)


def _params(args):
    from nanok2.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          seed=args.seed, max_tokens=args.max_tokens, stop=args.stop or [],
                          thinking_budget=args.thinking_budget)


def run_generate(args) -> int:
    engine = _load(args)
    ids = engine.tokenizer.encode(args.prompt, allowed_special="all")
    last = None
    for ev in engine.generate(ids, _params(args)):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        last = ev
    u = last.usage
    print(f"\n[{last.finish_reason}: {u['prompt_tokens']} prompt + {u['completion_tokens']} generated tokens]",
          file=sys.stderr)
    return 0


class _Printer:
    """Streams the parser's events: reasoning dimmed under a header (when the terminal shows colour), then the answer."""

    def __init__(self, out, colour: bool):
        self.out, self.colour, self.section = out, colour, None

    def __call__(self, event) -> None:
        kind = "reasoning" if event.kind == "reasoning" else "answer"
        if kind != self.section:
            if self.section is not None:
                self.out.write(RESET if self.colour else "")
                self.out.write("\n")
            self.out.write({"reasoning": "[thinking]\n", "answer": "[answer]\n"}[kind])
            self.out.write(DIM if self.colour and kind == "reasoning" else "")
            self.section = kind
        if event.kind in ("reasoning", "content", "tool_call_arguments"):
            self.out.write(event.text)
        elif event.kind == "tool_call_start":
            self.out.write(f"\n<tool call {event.name} ({event.id})> ")
        self.out.flush()

    def end(self) -> None:
        self.out.write((RESET if self.colour else "") + "\n")
        self.section = None


def run_chat(args) -> int:
    engine = _load(args)
    params = _params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    printer = _Printer(sys.stdout, colour=sys.stdout.isatty())
    print("nanok2 chat: type a message; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        reply = engine.chat(messages, params=params, on_event=printer)
        printer.end()
        u = reply["usage"]
        print(f"[{reply['finish_reason']}: {u['prompt_tokens']} prompt tokens ({u['cached_tokens']} cached), "
              f"{u['completion_tokens']} generated]", file=sys.stderr)
        messages.append({k: reply[k] for k in ("role", "content", "reasoning_content", "tool_calls") if k in reply})
    return 0


def _common(p) -> None:
    p.add_argument("--model", required=True, help="a checkpoint folder with config.json, weights and tiktoken.model")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--max-seq", type=int, default=None,
                   help="tokens the cache holds for the conversation (default: 8192 or the model's limit)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--thinking-budget", type=int, default=None, help="reasoning tokens before </think> is forced")
    p.add_argument("--threads", type=int, default=0)


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _common(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=run_generate)
    p = sub.add_parser("chat", help="an interactive chat that streams thinking and the answer")
    _common(p)
    p.add_argument("--system", default=None, help="a system message (default: K2's own)")
    p.set_defaults(func=run_chat)
