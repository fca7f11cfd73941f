"""`nanok2 bench qat`: what quantization-aware training buys: eval loss in bf16, after PTQ, after QAT.

A small K2-shaped MoE is trained for a few minutes on a synthetic language (a sparse random Markov
chain, so the loss has a known floor: the chain's entropy). At step `steps - qat_steps` the run forks:
the baseline keeps training in float; the QAT branch trains the same remaining steps, same data, same
schedule, with INT4 fake-quant (STE) on the routed experts, as K2-Thinking did in post-training. Then:

- bf16: the baseline in bf16, no quantization;
- PTQ: the baseline's experts quantized to INT4 after training (`quantize_model`);
- QAT fake-quant: the QAT model as it trained (fp32, fake-quantized experts);
- QAT INT4: the QAT model's experts quantized to INT4 and run on the CPU kernel with bf16 activations.

QAT INT4 should match QAT fake-quant (the trained weights quantize without loss) and beat PTQ.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from nanok2.bench.report import emit, table

MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             moe_intermediate_size=64, n_group=1, topk_group=1, routed_scaling_factor=2.5, rope_theta=10000.0,
             max_position_embeddings=1024, rope_scaling=None, bos_token_id=None, eos_token_id=None)


class MarkovLanguage:
    """Each token is followed by one of `branch` tokens with fixed, skewed probabilities."""

    def __init__(self, vocab: int, branch: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.next = torch.stack([torch.randperm(vocab, generator=g)[:branch] for _ in range(vocab)])   # [V, branch]
        p = torch.tensor([0.5 ** i for i in range(branch)])
        self.probs = p / p.sum()
        self.entropy = float(-(self.probs * self.probs.log()).sum())     # nats per token: the loss floor

    def batch(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab, (n,), generator=g)
        choice = torch.multinomial(self.probs, n * length, replacement=True, generator=g).view(n, length)
        for t in range(1, length):
            out[:, t] = self.next[out[:, t - 1], choice[:, t]]
        return out


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


@torch.no_grad()
def eval_loss(model, data: list[torch.Tensor]) -> float:
    model.eval()
    return sum(lm_loss(model, x).item() for x in data) / len(data)


def train(model, opt, lang, steps: range, total: int, lr: float, batch: int, seq: int, seed: int):
    """AdamW with warm-up and cosine decay over `total` steps; the data of step i depends only on (seed, i)."""
    model.train()
    for i in steps:
        for group in opt.param_groups:
            warm = min(1.0, (i + 1) / 20)
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * i / total))
        x = lang.batch(batch, seq + 1, torch.Generator().manual_seed(seed * 100003 + i))
        loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def run(args) -> int:
    from nanok2.config import ModelArgs
    from nanok2.errors import NanoK2Error
    from nanok2.model import build_model
    from nanok2.quant import enable_qat, quantize_model

    if not 0 < args.qat_steps <= args.steps:
        raise NanoK2Error(f"--qat-steps must be in [1, --steps={args.steps}], got {args.qat_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    margs = ModelArgs.from_dict(MODEL)
    lang = MarkovLanguage(margs.vocab_size, seed=args.seed)
    g = torch.Generator().manual_seed(10_000 + args.seed)
    data = [lang.batch(args.batch, args.seq + 1, g) for _ in range(args.eval_batches)]

    def fresh(state=None):
        m = build_model(margs, seed=args.seed)
        if state is not None:
            m.load_state_dict(state)
        return m

    base = fresh()
    opt = torch.optim.AdamW(base.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    fork = args.steps - args.qat_steps
    train(base, opt, lang, range(fork), args.steps, args.lr, args.batch, args.seq, args.seed)
    # fork: the QAT branch starts from the same weights and optimizer state
    qat = fresh(base.state_dict())
    qat_opt = torch.optim.AdamW(qat.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    qat_opt.load_state_dict(opt.state_dict())
    enable_qat(qat, "experts", args.group_size)
    train(base, opt, lang, range(fork, args.steps), args.steps, args.lr, args.batch, args.seq, args.seed)
    train(qat, qat_opt, lang, range(fork, args.steps), args.steps, args.lr, args.batch, args.seq, args.seed)
    train_s = time.perf_counter() - t0

    losses = {"fp32": eval_loss(base, data)}
    losses["bf16"] = eval_loss(fresh(base.state_dict()).to(torch.bfloat16), data)
    losses["ptq_int4"] = eval_loss(quantize_model(fresh(base.state_dict()), "experts", args.group_size)
                                   .to(torch.bfloat16), data)
    losses["qat_fakequant"] = eval_loss(qat, data)
    losses["qat_int4"] = eval_loss(quantize_model(fresh(qat.state_dict()), "experts", args.group_size)
                                   .to(torch.bfloat16), data)
    gap = losses["qat_int4"] / losses["qat_fakequant"] - 1
    rows = [["bf16 (no quantization)", f"{losses['bf16']:.4f}", ""],
            ["PTQ: INT4 experts after training", f"{losses['ptq_int4']:.4f}",
             f"{100 * (losses['ptq_int4'] / losses['bf16'] - 1):+.2f}%"],
            ["QAT: fake-quant (as trained, fp32)", f"{losses['qat_fakequant']:.4f}",
             f"{100 * (losses['qat_fakequant'] / losses['bf16'] - 1):+.2f}%"],
            ["QAT: INT4 experts (kernel, bf16)", f"{losses['qat_int4']:.4f}",
             f"{100 * (losses['qat_int4'] / losses['bf16'] - 1):+.2f}%"]]
    result = dict(bench="qat", steps=args.steps, qat_steps=args.qat_steps, group_size=args.group_size,
                  batch=args.batch, seq=args.seq, train_s=round(train_s, 1), loss_floor=round(lang.entropy, 4),
                  **{f"eval_loss_{k}": round(v, 5) for k, v in losses.items()},
                  qat_int4_vs_fakequant=round(gap, 5),
                  qat_beats_ptq=losses["qat_int4"] < losses["ptq_int4"])
    text = table(["model", "eval loss", "vs bf16"], rows)
    text += (f"\n{args.steps} AdamW steps ({args.qat_steps} of them QAT on the QAT branch), batch {args.batch}x{args.seq}, "
             f"{train_s:.0f} s; loss floor {lang.entropy:.4f} nats; QAT INT4 vs fake-quant {100 * gap:+.3f}%")
    emit(text, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("qat", help="eval loss: bf16 vs post-training INT4 vs quantization-aware training")
    p.add_argument("--steps", type=int, default=600, help="training steps in all")
    p.add_argument("--qat-steps", type=int, default=200, help="the last steps, with fake-quant on the QAT branch")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
