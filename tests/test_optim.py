"""MuonClip's maths: Newton–Schulz band, per-expert orthogonalisation, QK-Clip on MLA, balancing, schedules."""
import pytest
import torch

from nanok2.config import ModelArgs
from nanok2.errors import NanoK2Error
from nanok2.model import MLA, build_model, max_attention_logit
from nanok2.moe import MoE
from nanok2.optim import (NS_BAND, MuonClip, apply_qk_clip, as_matrices, is_muon_param, lr_at, muon_update,
                          newton_schulz5, orthogonalized, qk_clip_scales, sequence_balance_loss, update_expert_bias)

torch.set_num_threads(1)   # a shared 2-core machine: one thread is the fast and the reproducible choice


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 32, 48), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_singular_values_in_quintic_band(shape, dtype):
    """In fp32, and in bf16 (the band is wide enough for its rounding: 3 significant digits)."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if shape == (16, 16):   # a square matrix with a controlled spectrum (random ones have near-null directions)
        u, _, v = torch.linalg.svd(g)
        g = u @ torch.diag(torch.logspace(-2, 0, 16)) @ v
    o = newton_schulz5(g, dtype=dtype)
    assert o.dtype == torch.float32 and o.shape == g.shape
    s = torch.linalg.svdvals(o)
    lo, hi = NS_BAND
    slack = 0.01 if dtype == torch.float32 else 0.03
    assert s.min() >= lo * (1 - slack) and s.max() <= hi * (1 + slack), (s.min(), s.max())
    # the direction is G's polar factor U·Vᵀ: only the singular values are bent, not the vectors
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0)
    assert cos > 0.95


def test_experts_orthogonalised_one_by_one():
    E, I, D = 4, 8, 16
    gate_up = torch.randn(E, 2 * I, D)
    mats = as_matrices(gate_up, "model.layers.1.mlp.experts.gate_up_proj")
    assert mats.shape == (2 * E, I, D)
    update = orthogonalized(mats).reshape(E, 2 * I, D)
    # expert 2's up matrix alone gives the same update as inside the stack
    alone = newton_schulz5(gate_up[2, I:]) * 0.2 * max(I, D) ** 0.5
    torch.testing.assert_close(update[2, I:], alone)
    down = torch.randn(E, D, I)
    assert as_matrices(down, "model.layers.1.mlp.experts.down_proj").shape == (E, D, I)


def test_muon_update_momentum_and_scale():
    g = torch.randn(32, 64)
    m = torch.zeros_like(g)
    u = muon_update(g, m, beta=0.95)
    torch.testing.assert_close(m, g)                                       # M = 0.95·0 + G
    torch.testing.assert_close(u, newton_schulz5(g * 1.95) * 0.2 * 64 ** 0.5)  # Nesterov G + β·M
    rms = u.pow(2).mean().sqrt()
    assert 0.1 < rms < 0.3            # about AdamW's update RMS (0.2 · RMS of a semi-orthogonal matrix·sqrt(max))


def test_param_split():
    model = build_model(ModelArgs.from_preset("tiny"))
    muon = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    assert "model.layers.1.mlp.experts.gate_up_proj" in muon and "model.layers.0.self_attn.kv_b_proj.weight" in muon
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.norm.weight", "model.layers.0.self_attn.q_a_layernorm.weight"):
        assert name not in muon
    opt = MuonClip.for_model(model, lr=1e-3)
    assert [g["muon"] for g in opt.param_groups] == [True, False]
    assert all(m.track_max_logit for m in model.modules() if isinstance(m, MLA))


def _max_logit(attn: MLA, model, x) -> torch.Tensor:
    model(x)
    return attn.max_logit.clone()


@pytest.mark.parametrize("preset", ["tiny", "tiny-noqlora"])
def test_qk_clip_caps_clipped_heads_and_leaves_others_bit_identical(preset):
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_preset(preset)).eval()
    attn = model.model.layers[0].self_attn
    attn.track_max_logit = True
    q = attn.q_proj.weight if hasattr(attn, "q_proj") else attn.q_b_proj.weight
    with torch.no_grad():          # make heads 0 and 2 produce large logits (both nope and rope parts)
        q.view(attn.n_heads, -1, q.shape[1])[[0, 2]] *= 60.0
        attn.kv_b_proj.weight.mul_(8.0)
    x = torch.randint(0, 512, (2, 24))
    before = _max_logit(attn, model, x)
    tau = float(before.sort().values[1:3].mean())      # between the unclipped and the clipped heads
    clipped = before > tau
    assert clipped.any() and (~clipped).any()
    q0, kv0, kva0 = q.clone(), attn.kv_b_proj.weight.clone(), attn.kv_a_proj_with_mqa.weight.clone()
    gamma = apply_qk_clip(attn, before, tau)
    torch.testing.assert_close(gamma, qk_clip_scales(before, tau))
    after = _max_logit(attn, model, x)
    assert (after[clipped] <= tau * 1.01).all() and (after[clipped] >= tau * 0.99).all(), (after, tau)
    H, dn, dr, dv = attn.n_heads, attn.dn, attn.dr, attn.dv
    qh, q0h = q.view(H, dn + dr, -1), q0.view(H, dn + dr, -1)
    kvh, kv0h = attn.kv_b_proj.weight.view(H, dn + dv, -1), kv0.view(H, dn + dv, -1)
    for h in range(H):
        if clipped[h]:
            g = gamma[h]
            torch.testing.assert_close(qh[h, :dn], q0h[h, :dn] * g.sqrt())   # q_nope ×√γ
            torch.testing.assert_close(qh[h, dn:], q0h[h, dn:] * g)          # q_rope ×γ
            torch.testing.assert_close(kvh[h, :dn], kv0h[h, :dn] * g.sqrt()) # k_nope ×√γ
        else:
            assert torch.equal(qh[h], q0h[h]) and torch.equal(kvh[h, :dn], kv0h[h, :dn])
            assert torch.equal(after[h], before[h])
        assert torch.equal(kvh[h, dn:], kv0h[h, dn:])                        # v untouched
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, kva0)                 # shared k_rope untouched


def test_expert_bias_balances_a_skewed_router_only_when_on():
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(0)
    x = torch.randn(512, args.hidden_size) + 0.5     # a mean direction the skewed router rows pick up

    def balance_after(speed: float, steps: int = 200) -> tuple[float, float]:
        torch.manual_seed(1)
        moe = MoE(args)
        with torch.no_grad():
            moe.gate.weight.normal_(0, 0.02)
            moe.gate.weight[0] += 0.05           # experts 0 and 1 favoured by every token
            moe.gate.weight[1] += 0.04
            for p in moe.experts.parameters():
                p.normal_(0, 0.02)
        ratios = []
        for _ in range(steps):
            with torch.no_grad():
                moe(x)
                c = moe.last_counts
                ratios.append(float(c.max() / c.float().mean()))
                update_expert_bias(moe.gate.e_score_correction_bias, c, speed)
        return ratios[0], sum(ratios[-20:]) / 20

    first_on, last_on = balance_after(0.01)
    first_off, last_off = balance_after(0.0)
    assert first_on == first_off and first_on > 2.0
    assert last_on < 1.3 < first_on
    assert last_off == first_off


def test_update_expert_bias_rule():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 2, 4, 4]), 0.001)   # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.001, 0.001]))


def test_sequence_balance_loss_is_alpha_when_uniform():
    B, T, E, k = 2, 8, 4, 2
    probs = torch.full((B, T, E), 0.5)
    topk = torch.tensor([[0, 1], [2, 3]] * (T // 2)).expand(B, T, k)
    torch.testing.assert_close(sequence_balance_loss(probs, topk, 1e-4), torch.tensor(1e-4))
    skew = torch.zeros(B, T, k, dtype=torch.long)
    skew[..., 1] = 1
    probs = torch.tensor([0.9, 0.9, 0.1, 0.1]).expand(B, T, E)
    assert sequence_balance_loss(probs, skew, 1e-4) > 1e-4


def test_schedules():
    assert lr_at(0, 1.0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_at(50, 1.0, 100, 10, "constant") == 1.0
    assert lr_at(50, 1.0, 100, 10, "wsd", decay_frac=0.2) == 1.0
    assert lr_at(99, 1.0, 100, 10, "wsd", decay_frac=0.2, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(99, 1.0, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(NanoK2Error, match="constant, wsd, cosine"):
        lr_at(50, 1.0, 100, 10, "linear")


def test_muonclip_step_lowers_loss_and_records_max_logit():
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_preset("tiny"))
    opt = MuonClip.for_model(model, lr=3e-3, qk_clip_tau=100.0)
    x = torch.randint(0, 512, (4, 32))
    losses = []
    for _ in range(8):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.observe_logits()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    assert 0 < opt.last_max_logit < 100
    state = opt.state_dict()
    assert any("momentum" in s for s in state["state"].values()) and any("exp_avg" in s for s in state["state"].values())


def test_muon_step_with_bf16_newton_schulz_follows_the_fp32_one():
    """ns_dtype=bfloat16 changes the working precision of the orthogonalisation, not the update."""
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 32))
    deltas = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(ModelArgs.from_preset("tiny"), seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = MuonClip.for_model(model, lr=1e-2, ns_dtype=dtype)
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        deltas[dtype] = {n: p.detach() - before[n] for n, p in model.named_parameters() if is_muon_param(n, p)}
    # an expert's gradient from a few tokens is nearly low-rank: NS lifts its near-null directions to the band,
    # and there bf16's rounding shows (cosine about 0.96); dense matrices agree to 0.99 and better
    cos = {name: float(torch.nn.functional.cosine_similarity(d32.flatten(), deltas[torch.bfloat16][name].flatten(),
                                                             dim=0)) for name, d32 in deltas[torch.float32].items()}
    assert min(cos.values()) > 0.95 and sum(cos.values()) / len(cos) > 0.98, cos
    assert all(c > 0.995 for name, c in cos.items() if "q_a_proj" in name or "shared_experts" in name), cos


@pytest.mark.parametrize("tq, tk, chunk", [(37, 37, 8), (37, 37, 512), (5, 40, 2), (1, 9, 4)])
def test_max_attention_logit_matches_the_whole_masked_score_matrix(tq, tk, chunk):
    """QK-Clip's S_max read in query blocks against only the keys each block sees (training's path) is the
    max of the whole masked [B, H, Tq, Tk] score matrix, for causal self-attention, for the last Tq queries
    of Tk positions (a prefill after a cache), and for an explicit mask. Scores are positive and grow with
    the key's position, so a key let through the mask by mistake would raise the max."""
    torch.manual_seed(0)
    q = torch.rand(2, 3, tq, 16)
    k = torch.rand(2, 3, tk, 16) * torch.arange(1, tk + 1.0)[:, None]
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)[None, None]
    scores = (q @ k.mT) * 0.25
    whole = scores.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(max_attention_logit(q, k, 0.25, chunk=chunk), whole)
    assert (whole < scores.amax(dim=(0, 2, 3))).any() or tq == 1      # the mask did hide the largest scores
    window = causal.tril(tk - tq - 1)                                   # causal, less the newest key
    torch.testing.assert_close(max_attention_logit(q, k, 0.25, window),
                               scores.masked_fill(~window, float("-inf")).amax(dim=(0, 2, 3)))
