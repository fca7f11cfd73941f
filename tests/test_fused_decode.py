"""The fused C++ decode step against the engine's eager step (its reference): same logits and cache rows on
every tiny config and weight form (fp32, bf16, INT4 experts, INT4 linear layers), the same greedy tokens
through the engine, and a clear fallback where it does not apply."""
import copy

import pytest
import torch

from nanok2 import ModelArgs, build_model
from nanok2.engine import Engine
from nanok2.fused_decode import FusedDecoder, kernel
from nanok2.int4_linear import set_int4_kernel
from nanok2.quant import quantize_model
from nanok2.sampling import SamplingParams

PRESETS = ["tiny", "tiny-noqlora", "tiny-grouped", "tiny-yarn"]

pytestmark = [pytest.mark.skipif(kernel() is None, reason="no AVX2/FMA or no C++ compiler here"),
              pytest.mark.usefixtures("one_thread")]


def tiny_model(preset="tiny", dtype=torch.float32, seed=0):
    # a wide init keeps the logits apart, so greedy tokens do not hinge on rounding
    return build_model(ModelArgs.from_preset(preset, initializer_range=0.1), seed=seed, dtype=dtype).eval()


def step_both(model, prompts, tokens):
    """Prefill `prompts` into slots 0.., then decode `tokens` (one per slot) with the eager step and, from
    the same cache, with the fused one. -> (eager logits, fused logits, eager cache, fused cache)."""
    eng = Engine(model, None, max_batch=len(prompts), max_seq=64)
    for slot, p in enumerate(prompts):
        eng.cache.acquire(p)
        eng._prefill(slot, p, 0)
    before = eng.cache.c_kv.clone(), eng.cache.k_rope.clone()
    slots, positions = list(range(len(prompts))), [len(p) for p in prompts]
    want = eng._decode(slots, tokens, positions)
    want_cache = eng.cache.c_kv.clone(), eng.cache.k_rope.clone()
    eng.cache.c_kv.copy_(before[0])
    eng.cache.k_rope.copy_(before[1])
    fused = FusedDecoder.build(model)
    assert fused is not None
    got = fused.step(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots), eng.cache.c_kv, eng.cache.k_rope)
    return want, got, want_cache, (eng.cache.c_kv, eng.cache.k_rope)


def step_both_on_two_threads(model, prompts, tokens):
    """`step_both` with two torch threads, whatever the module's one-thread default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return step_both(model, prompts, tokens)
    finally:
        torch.set_num_threads(before)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11] * 6]
TOKENS = [11, 12, 13]


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_step_matches_the_eager_step_in_fp32(preset):
    want, got, want_cache, got_cache = step_both(tiny_model(preset), PROMPTS, TOKENS)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for g, w in zip(got_cache, want_cache):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset,threads", [(p, 1) for p in PRESETS] + [("tiny", 2)])
def test_fused_step_in_bf16_is_at_least_as_exact_as_the_eager_step(preset, threads):
    """On one thread the 3 sequences' attention runs all heads of a sequence per task (the bf16 cache widened
    once for them); on two, one head per task, reading the bf16 cache directly."""
    model = tiny_model(preset, torch.bfloat16)
    step = step_both if threads == 1 else step_both_on_two_threads
    want, got, want_cache, got_cache = step(model, PROMPTS, TOKENS)
    # the truth for these weights and this cache: the eager step of the same weights in fp32
    exact = Engine(copy.deepcopy(model).float(), None, max_batch=len(PROMPTS), max_seq=64)
    eng = Engine(model, None, max_batch=len(PROMPTS), max_seq=64)
    for slot, p in enumerate(PROMPTS):
        eng._prefill(slot, p, 0)
    exact.cache.c_kv.copy_(eng.cache.c_kv)
    exact.cache.k_rope.copy_(eng.cache.k_rope)
    truth = exact._decode(list(range(len(PROMPTS))), TOKENS, [len(p) for p in PROMPTS])
    # the eager bf16 step rounds activations to bf16 between ops; the fused one keeps them in fp32
    assert (got - truth).abs().max() <= 1.1 * (want - truth).abs().max()
    assert (got - truth).abs().max() < 0.05 * truth.abs().max()
    for g, w in zip(got_cache, want_cache):
        assert (g.float() - w.float()).abs().max().item() < 0.03 * w.float().abs().max().item()


@pytest.mark.parametrize("targets", ["experts", "linear"])
def test_fused_step_with_int4_weights_matches_the_dequantized_reference(targets):
    model = quantize_model(copy.deepcopy(tiny_model("tiny", torch.bfloat16)), targets)
    set_int4_kernel(model, "reference")   # the eager step then multiplies by the dequantized weights
    # The INT4 kernels round the activations, the reference does not: a router margin of 0.003 (there is one
    # in this model) would then pick another expert and the logits would differ by more than rounding. Selection
    # biases a whole unit apart fix each layer's choice (sigmoid scores lie in (0, 1)), so the experts'
    # maths is compared alone; routing itself is compared by the fp32 and bf16 tests above.
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers[model.args.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randperm(model.args.n_routed_experts, generator=g).float())
    want, got, _, _ = step_both(model, PROMPTS, TOKENS)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 0.03 * scale
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("targets", [None, "experts"])
def test_fused_step_at_batch_16_on_two_threads_matches_the_eager_step(targets):
    """Batch 16 takes the parallel per-expert set-up and sum; INT4 experts beside bf16 shared experts split the
    rows by bytes. Both threads run, whatever the module's one-thread default."""
    model = tiny_model("tiny", torch.float32 if targets is None else torch.bfloat16)
    if targets:
        model = quantize_model(model, targets)
        set_int4_kernel(model, "reference")
        g = torch.Generator().manual_seed(1)   # fixed routing, as in the INT4 test above
        for layer in model.model.layers[model.args.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randperm(model.args.n_routed_experts, generator=g).float())
    prompts = [[(5 * i + b) % 500 + 1 for i in range(3 + b % 7)] for b in range(16)]
    tokens = [(37 * b) % 500 for b in range(16)]
    want, got, want_cache, got_cache = step_both_on_two_threads(model, prompts, tokens)
    if targets is None:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:   # INT4 kernels round the activations: logits agree to that rounding, so a near tie may flip
        tol = 0.03 * want.abs().max().item()
        assert (got - want).abs().max().item() < tol
        chosen = want.gather(1, got.argmax(-1, keepdim=True))[:, 0]
        assert (want.max(-1).values - chosen).max().item() < 2 * tol


def test_fused_step_with_many_claims_per_expert_phase_matches_the_eager_step():
    """Wide enough that the two threads claim expert rows many times from both ends and meet in the middle
    (an up phase costs ~2e7, a claim takes a quarter of what is left, at least 2e5): the tiny presets fit
    in one claim."""
    args = ModelArgs.from_preset("tiny", initializer_range=0.1, hidden_size=256, intermediate_size=512,
                                 moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4)
    model = build_model(args, seed=0, dtype=torch.float32).eval()
    prompts = [[(3 * i + b) % 500 + 1 for i in range(2 + b % 5)] for b in range(16)]
    tokens = [(29 * b) % 500 for b in range(16)]
    want, got, want_cache, got_cache = step_both_on_two_threads(model, prompts, tokens)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_cache[0], want_cache[0], atol=1e-5, rtol=1e-5)


def test_fused_step_counts_the_experts_the_eager_step_routes_to():
    model = tiny_model()
    eng = Engine(model, None, max_batch=len(PROMPTS), max_seq=64)
    for slot, p in enumerate(PROMPTS):
        eng._prefill(slot, p, 0)
    eng._decode(list(range(len(PROMPTS))), TOKENS, [len(p) for p in PROMPTS])
    moes = [layer.mlp for layer in model.model.layers[model.args.first_k_dense_replace:]]
    want = [m.last_counts.clone() for m in moes]
    FusedDecoder.build(model).step(torch.tensor(TOKENS), torch.tensor([len(p) for p in PROMPTS]),
                                   torch.arange(len(PROMPTS)), eng.cache.c_kv, eng.cache.k_rope)
    assert all(torch.equal(m.last_counts, w) for m, w in zip(moes, want))


def test_a_token_outside_the_vocabulary_is_a_clear_error():
    model = tiny_model()
    eng = Engine(model, None, max_batch=1, max_seq=32)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        FusedDecoder.build(model).step(torch.tensor([model.args.vocab_size]), torch.tensor([0]), torch.tensor([0]),
                                       eng.cache.c_kv, eng.cache.k_rope)


@pytest.mark.parametrize("preset", PRESETS)
def test_engine_with_cpu_kernels_decodes_the_same_greedy_tokens(preset):
    model = tiny_model(preset)
    prompts = [[(7 * i + n) % 256 for i in range(n)] for n in (13, 4, 21)]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (64, 30, 45)]
    eager = Engine(model, max_batch=2, max_seq=96)
    fast = Engine(model, max_batch=2, max_seq=96, cpu_kernels=True)
    assert eager.fused is None and fast.fused is not None
    run = lambda eng: [[e.token for e in eng.generate(prompts, params) if e.request == i and e.token is not None]
                       for i in range(len(prompts))]
    assert run(fast) == run(eager)


def test_fused_step_sets_the_expert_counts_the_bench_reads():
    model = tiny_model()
    fused = FusedDecoder.build(model)
    eng = Engine(model, None, max_batch=2, max_seq=32)
    fused.step(torch.tensor([3, 4]), torch.tensor([0, 0]), torch.tensor([0, 1]), eng.cache.c_kv, eng.cache.k_rope)
    moe = model.model.layers[1].mlp
    assert int(moe.last_counts.sum()) == 2 * model.args.num_experts_per_tok


def test_what_the_fused_step_does_not_cover_keeps_the_eager_step():
    odd = build_model(ModelArgs.from_preset("tiny", hidden_size=60, initializer_range=0.1)).eval()
    assert FusedDecoder.build(odd) is None
    assert Engine(odd, max_seq=32, cpu_kernels=True).fused is None
    half = tiny_model().to(torch.float16)
    assert FusedDecoder.build(half) is None
