"""The model's maths against transformers' DeepseekV3 (the test-only reference), and its own fast/slow paths."""
import pytest
import torch

from hf_peer import hf_model
from nanok2 import ModelArgs, build_model, load_model, save_model
from nanok2.model import padded_sdpa_attention, reference_attention, sdpa_attention
from nanok2.moe import grouped_experts, looped_experts

YARN = dict(type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
            original_max_position_embeddings=16)
K2_YARN = dict(type="yarn", factor=64.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
               original_max_position_embeddings=16)

# each case changes what the routing / attention / layer layout exercises
CASES = {
    "q_lora": dict(),
    "no_q_lora": dict(q_lora_rank=None),
    "grouped_topk": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    "yarn_mscale_all_dim": dict(rope_scaling=YARN),
    "yarn_k2_values": dict(rope_scaling=K2_YARN, rms_norm_eps=1e-5),
    "dense0_shared0": dict(first_k_dense_replace=0, n_shared_experts=0),
    "dense2_shared2": dict(first_k_dense_replace=2, n_shared_experts=2, num_hidden_layers=4),
    "no_norm_topk": dict(norm_topk_prob=False, routed_scaling_factor=1.0),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    args = ModelArgs.from_preset("tiny", **CASES[case])
    reference = hf_model(args, seed=hash(case) % 1000)
    reference.save_pretrained(tmp_path)                 # a checkpoint transformers itself wrote
    ours = load_model(tmp_path)
    assert ours.model.layers[-1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    ids = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == (2, 64, args.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["q_lora", "no_q_lora", "yarn_mscale_all_dim", "dense0_shared0", "tied"])
def test_nanok2_checkpoint_loads_in_transformers(case, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    args = ModelArgs.from_preset("tiny", **CASES[case])
    ours = build_model(args, seed=3)
    with torch.no_grad():   # non-trivial router bias and weights so every tensor matters
        for name, b in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
        for p in ours.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    save_model(ours, tmp_path, max_shard_size="60KB")      # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    again = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


@pytest.mark.parametrize("preset", ["tiny", "tiny-grouped"])
def test_grouped_experts_equal_looped_reference(preset):
    args = ModelArgs.from_preset(preset)
    moe = build_model(args, seed=5).model.layers[-1].mlp
    x = torch.randn(37, args.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
        w, idx, _ = moe.gate(x)
        fast = grouped_experts(moe.experts, x, idx, w)
        slow = looped_experts(moe.experts, x, idx, w)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


def test_bias_changes_selection_not_weights():
    from nanok2.moe import route
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w0, i0 = route(logits, torch.zeros(4), 2, 1, 1, False, 1.0)
    w1, i1 = route(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), 2, 1, 1, False, 1.0)
    assert set(i0[0].tolist()) == {0, 1} and set(i1[0].tolist()) == {0, 3}
    # expert 3 is selected through the bias, but weighted by its unbiased sigmoid score
    assert torch.allclose(w1[0][i1[0] == 3], torch.sigmoid(torch.tensor([-1.0])))


def test_bf16_model_keeps_router_fp32():
    model = build_model(ModelArgs.from_preset("tiny"), dtype=torch.bfloat16)
    gate = model.model.layers[-1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 512, (1, 8))).dtype == torch.bfloat16


def test_k2_thinking_counts_on_meta_device():
    from nanok2.info import model_stats
    s = model_stats(ModelArgs.from_preset("kimi-k2-thinking"))
    assert s.total_params == 1_026_408_209_408
    assert s.active_params == 32_861_477_888
    assert s.kv_cache_numbers_per_token_per_layer == 576


def test_bench_preset_keeps_k2_proportions():
    """The bytes a decode step reads split as in K2 (routed experts 2/3, lm_head a few %), so the INT4
    bandwidth bounds measured on the preset are K2's."""
    from nanok2.info import model_stats
    s = model_stats(ModelArgs.from_preset("bench"))
    k2 = model_stats(ModelArgs.from_preset("kimi-k2-thinking"))
    assert 0.5e9 <= s.total_params <= 1.0e9
    assert k2.routed_share_of_decode_bytes == pytest.approx(0.667, abs=0.005)
    assert k2.lm_head_share_of_decode_bytes == pytest.approx(0.037, abs=0.002)
    assert s.routed_share_of_decode_bytes == pytest.approx(k2.routed_share_of_decode_bytes, abs=0.02)
    assert s.lm_head_share_of_decode_bytes == pytest.approx(k2.lm_head_share_of_decode_bytes, abs=0.01)
    assert k2.int4_experts_decode_bound == pytest.approx(1.92, abs=0.01)
    assert k2.int4_all_linear_decode_bound == pytest.approx(3.21, abs=0.02)
    for bound in ("int4_experts_decode_bound", "int4_all_linear_decode_bound"):
        assert getattr(s, bound) == pytest.approx(getattr(k2, bound), rel=0.03)


@pytest.mark.parametrize("dv", [32, 64])
@pytest.mark.parametrize("tq, tk, with_mask", [(33, 33, False), (1, 9, False), (17, 17, True), (4, 21, True)])
def test_attention_kernels_match_the_materialised_reference(tq, tk, with_mask, dv):
    """Training's kernel (SDPA with the narrower of v and q/k zero-padded to the other's head dim) and plain
    SDPA give the reference's output and gradients, with v narrower (agent-tiny, K2) and wider than q/k:
    causal self-attention and one query against its cache without a mask (the contract of mask=None), and
    with a mask, also for the last Tq queries of Tk positions."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, tq, 48, generator=g), torch.randn(2, 3, tk, 48, generator=g)
    v = torch.randn(2, 3, tk, dv, generator=g)
    mask = None
    if with_mask:        # causal plus left padding of 5 in the second row
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, :5] = False
        mask[1, :, :5, 0] = True        # a query with every key hidden would be NaN in any kernel
    outs, grads = {}, {}
    for name, kernel in (("reference", reference_attention), ("sdpa", sdpa_attention),
                         ("padded", padded_sdpa_attention)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = kernel(*leaves, 48 ** -0.5, mask)
        (out * torch.linspace(-1, 1, dv)).sum().backward()
        outs[name], grads[name] = out.detach(), [t.grad for t in leaves]
    assert outs["padded"].shape == (2, 3, tq, dv)
    for name in ("sdpa", "padded"):
        torch.testing.assert_close(outs[name], outs["reference"], atol=1e-5, rtol=1e-4)
        for a, b in zip(grads[name], grads["reference"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
