"""`nanok2 bench decode`: how fast the engine prefills and decodes, in tok/s and achieved memory bandwidth.

Decoding on a CPU is bound by the bytes of weights read per step, so next to tok/s the table gives the
bandwidth achieved: the weights a step must read (everything dense, one embedding row per token, and in
each MoE layer the experts that step's tokens were routed to, counted from the router) plus the cached
latents, divided by the step time; next to it, this machine's read bandwidth and the tok/s it allows
at batch 1 (the memory-bound ceiling). Batches 1, 4 and 16 show what batching buys when a larger batch
touches more experts. `--vs transformers` runs the same checkpoint through transformers' `generate` in
the same process, side by side, and reports the ratio at batch 1. Every figure is the median of
`--rounds` interleaved rounds, so a busy moment on a shared machine does not tilt the ratios.

`measure_decode` is the measurement itself, also used by `nanok2 bench quant` on quantized models.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from nanok2.bench.report import emit, machine, peak_rss_bytes, table


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in list(module.parameters()) + list(module.buffers()))


def step_bytes(model, batch_size: int, experts_touched: list[int], cached_tokens: int, cache_bytes_per_token: int) -> int:
    """Bytes one decode step reads: the dense weights, `batch_size` embedding rows, the routed experts that
    were touched (`experts_touched[j]` in the j-th MoE layer) and `cached_tokens` tokens of latent cache."""
    from nanok2.moe import MoE

    emb = model.model.embed_tokens.weight
    dense = _module_bytes(model) - emb.nbytes + batch_size * emb[0].nbytes
    if model.args.tie_word_embeddings:
        dense += emb.nbytes                      # the tied lm_head is read whole
    routed = 0
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe, touched in zip(moes, experts_touched):
        per_expert = _module_bytes(moe.experts) / moe.experts.n_experts
        dense -= _module_bytes(moe.experts)
        routed += int(per_expert * touched)
    return dense + routed + cached_tokens * cache_bytes_per_token


def read_bandwidth_gb_s(n_bytes: int = 256 * 2**20) -> float:
    """This machine's memory read bandwidth with torch's threads: the best of a few sums over n_bytes of bf16."""
    data = torch.ones(n_bytes // 2, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best / 1e9


def measure_decode(model, batch_size: int, prompt_len: int = 32, new_tokens: int = 32) -> dict:
    """Greedy decoding of `batch_size` random prompts of `prompt_len` tokens, `new_tokens` each, with the Engine.

    -> decode_tok_s (generated tokens per second over all requests, after the first decode step),
    prefill_tok_s, step_ms, gb_s (achieved bandwidth, see `step_bytes`), experts_per_layer (distinct
    experts a step touched, averaged), kv_cache_bytes_per_token.
    """
    from nanok2.engine import Engine
    from nanok2.moe import MoE
    from nanok2.sampling import SamplingParams

    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(batch_size)
    engine = Engine(model, None, max_batch=batch_size, max_seq=prompt_len + new_tokens + 1, cpu_kernels=True)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, stop_token_ids=[])
    # warm-up: first calls allocate and choose kernels; it also leaves a cached prefix nobody shares
    list(engine.generate([vocab - 1] * 4, SamplingParams(temperature=0, max_tokens=3, stop_token_ids=[])))
    engine.stats.update(prefill_tokens=0, prefill_s=0.0)
    for b in range(batch_size):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        prompt[0] = b % (vocab - 1)       # distinct first tokens: no request reuses another's prefix
        engine.add_request(prompt, params)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    engine.step()                          # prefill every request, then the first decode step
    steps, touched, cached = 0, [0] * len(moes), 0
    t = time.perf_counter()
    while engine.has_work():
        cached += sum(r.pos + 1 for r in engine.running)
        n = len(engine.running)
        engine.step()
        steps += 1
        for j, moe in enumerate(moes):
            touched[j] += int((moe.last_counts > 0).sum())
        assert n == batch_size or not engine.has_work(), "requests of equal length run in lockstep"
    elapsed = time.perf_counter() - t
    touched = [x / max(steps, 1) for x in touched]
    step_s = elapsed / max(steps, 1)
    bytes_per_step = step_bytes(model, batch_size, touched, cached // max(steps, 1), engine.cache.bytes_per_token)
    return dict(batch_size=batch_size, decode_tok_s=batch_size * steps / elapsed,
                prefill_tok_s=engine.stats["prefill_tokens"] / engine.stats["prefill_s"],
                step_ms=1e3 * step_s, gb_s=bytes_per_step / step_s / 1e9,
                experts_per_layer=sum(touched) / max(len(touched), 1),
                kv_cache_bytes_per_token=engine.cache.bytes_per_token)


def median_by_speed(rounds: list[dict]) -> dict:
    """The round with the median decode tok/s (the lower middle one of an even count)."""
    ordered = sorted(rounds, key=lambda r: r["decode_tok_s"])
    return ordered[(len(ordered) - 1) // 2]


def speed_range(rounds: list[dict]) -> str:
    """'slowest-fastest' decode tok/s over the rounds, for the table."""
    speeds = [r["decode_tok_s"] for r in rounds]
    return f"{min(speeds):.1f}-{max(speeds):.1f}"


def transformers_decoder(path: str, dtype: torch.dtype, prompt_len: int, new_tokens: int):
    """transformers' model for the same checkpoint; -> a function measuring its `generate` (greedy, batch 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    def measure() -> dict:
        run(2)                                   # warm-up
        prefill_s = min(run(1) for _ in range(2))
        total_s = run(new_tokens)
        return dict(decode_tok_s=(new_tokens - 1) / (total_s - prefill_s), prefill_tok_s=prompt_len / prefill_s)

    return measure


def run(args) -> int:
    from nanok2.checkpoint import load_model, parse_dtype, save_model
    from nanok2.config import ModelArgs
    from nanok2.errors import NanoK2Error
    from nanok2.model import build_model

    if bool(args.preset) == bool(args.model):
        raise NanoK2Error("give exactly one of --preset NAME or --model PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    if args.preset:
        model = build_model(ModelArgs.from_preset(args.preset), dtype=dtype).eval()
    else:
        model = load_model(args.model, dtype=dtype).eval()
    a = model.args
    rows, rounds, hf_rounds = [], {}, []

    with tempfile.TemporaryDirectory() as tmp:
        hf_measure = None
        if args.vs == "transformers":
            path = args.model
            if path is None:
                save_model(model, tmp, model_type="deepseek_v3")
                path = tmp
            hf_measure = transformers_decoder(path, dtype, args.prompt_len, args.new_tokens)
        # Interleaved rounds, each figure the median of its rounds: a load spike or a slow spell of a shared
        # machine hits one round of every batch size, not one batch size. Not the best round: batch 1's
        # measurements are 7x shorter than batch 16's (0.3 s against 2.2 s on the bench preset), and the
        # fastest of a few short windows catches the machine's fast moments more than the fastest long one.
        for _ in range(args.rounds):
            if hf_measure is not None:
                hf_rounds.append(hf_measure())
            for b in sorted(set(args.batches) | ({1} if hf_measure is not None else set())):
                rounds.setdefault(b, []).append(measure_decode(model, b, args.prompt_len, args.new_tokens))
        del hf_measure
    results = {b: median_by_speed(rs) for b, rs in rounds.items()}
    hf = median_by_speed(hf_rounds) if hf_rounds else None
    for b in args.batches:
        r = results[b]
        rows.append([f"nanok2 b={b}", f"{r['decode_tok_s']:.1f}", speed_range(rounds[b]),
                     f"{r['step_ms']:.1f}", f"{r['gb_s']:.2f}", f"{r['experts_per_layer']:.1f}",
                     f"{r['prefill_tok_s']:.0f}"])
    latent_bytes = a.num_hidden_layers * a.kv_cache_dim * torch.empty((), dtype=dtype).element_size()
    first = results[args.batches[0]]
    read_gb_s = read_bandwidth_gb_s()
    bytes_b1 = step_bytes(model, 1, [a.num_experts_per_tok] * a.n_moe_layers, args.prompt_len + args.new_tokens // 2,
                          latent_bytes)
    assert first["kv_cache_bytes_per_token"] == latent_bytes
    result = dict(bench="decode", model=args.model or args.preset, dtype=str(dtype).replace("torch.", ""),
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=torch.get_num_threads(),
                  load_avg=round(os.getloadavg()[0], 2), **machine(),
                  decode_tok_s=round(first["decode_tok_s"], 2), prefill_tok_s=round(first["prefill_tok_s"], 1),
                  gb_s=round(first["gb_s"], 3), read_bandwidth_gb_s=round(read_gb_s, 2),
                  bandwidth_bound_tok_s_batch1=round(read_gb_s * 1e9 / bytes_b1, 1), kv_cache_bytes_per_token=latent_bytes,
                  kv_cache_numbers_per_token_per_layer=a.kv_cache_dim)
    for b in args.batches:
        result[f"decode_tok_s_batch{b}"] = round(results[b]["decode_tok_s"], 2)
    if 1 in results:
        for b in args.batches:
            if b != 1:
                result[f"batch{b}_vs_batch1"] = round(results[b]["decode_tok_s"] / results[1]["decode_tok_s"], 2)
    if hf is not None:
        rows.append(["transformers b=1", f"{hf['decode_tok_s']:.1f}", speed_range(hf_rounds),
                     f"{1e3 / hf['decode_tok_s']:.1f}", "", "", f"{hf['prefill_tok_s']:.0f}"])
        result.update(transformers_decode_tok_s=round(hf["decode_tok_s"], 2),
                      transformers_prefill_tok_s=round(hf["prefill_tok_s"], 1),
                      speedup_vs_transformers=round(results[1]["decode_tok_s"] / hf["decode_tok_s"], 2))
    result["peak_rss_bytes"] = peak_rss_bytes()
    text = table(["engine", "decode tok/s", "rounds", "step ms", "GB/s", "experts/layer", "prefill tok/s"], rows)
    if 1 in results:
        text += "\n" + ", ".join(f"batch {b} / batch 1: {result[f'batch{b}_vs_batch1']:.2f}x" for b in args.batches if b != 1)
    text += (f"\nKV cache: {latent_bytes} bytes/token ({a.kv_cache_dim} numbers/layer x {a.num_hidden_layers} layers), "
             f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, load average {result['load_avg']} on {result['cpus']} CPUs\n"
             f"memory read bandwidth {read_gb_s:.1f} GB/s: batch 1 reads {bytes_b1 / 1e6:.0f} MB per token, "
             f"so at most {result['bandwidth_bound_tok_s_batch1']} tok/s")
    emit(text, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("decode", help="prefill and decode tok/s, GB/s, peak RSS; optionally vs transformers")
    p.add_argument("--model", help="a checkpoint folder")
    p.add_argument("--preset", help="a named preset with random weights (e.g. bench)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (median of)")
    p.add_argument("--vs", choices=["transformers"], help="run the same checkpoint through transformers too")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
