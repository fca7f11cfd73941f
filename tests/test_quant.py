"""INT4 (nanok2.quant, nanok2.int4_linear): bit-exact packing against compressed-tensors, checkpoints its
decompressor reads, CPU kernel vs dequantized reference, QAT, and the errors a user can cause."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from nanok2.checkpoint import load_model, save_model
from nanok2.config import ModelArgs
from nanok2.errors import CheckpointError, NanoK2Error
from nanok2.int4_linear import Int4Experts, Int4Linear, gemv_kernel, set_int4_kernel
from nanok2.model import build_model
from nanok2.moe import grouped_experts, looped_experts
from nanok2.quant import (dequantize, disable_qat, enable_qat, fake_quant, pack_int4, quantization_config,
                          quantize_groupwise, quantize_model, save_quantized, unpack_int4)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def tiny(seed=0):
    return build_model(ModelArgs.from_preset("tiny"), seed=seed).eval()


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("shape", [(1, 8), (16, 64), (48, 256), (3, 32, 96)])
def test_pack_bit_identical_to_compressed_tensors(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(-8, 8, shape, generator=g).to(torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(packed, ct_helpers.pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(ct_helpers.unpack_from_int32(packed, 4, torch.Size(shape)), q)


def test_pack_bit_order():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)    # stored 0, 1, 8, 9, 10, 11, 12, 15
    expected = sum(v << (4 * j) for j, v in enumerate([0, 1, 8, 9, 10, 11, 12, 15]))
    assert pack_int4(q).item() == expected - (1 << 32)                  # the top nibble 15 sets the sign bit


def test_quantize_groupwise_matches_compressed_tensors_quantize():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_groupwise(w, 32)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert scale.dtype == torch.bfloat16 and scale.shape == (32, 4)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    theirs = quantize(w, scale.float(), torch.zeros_like(scale, dtype=torch.int8), args, dtype=torch.int8)
    assert torch.equal(q, theirs)
    err = (dequantize(q, scale) - w).abs()
    assert bool((err <= 0.55 * scale.float().repeat_interleave(32, 1)).all())   # 0.5 step, + bf16 rounding of the scale


def test_fake_quant_forward_is_dequantized_and_backward_is_identity():
    w = torch.randn(16, 64, requires_grad=True)
    y = fake_quant(w, 32)
    assert torch.equal(y.detach(), dequantize(*quantize_groupwise(w.detach(), 32)))
    (y * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(16, 64))


# ---------------------------------------------------------------- modules, kernel vs reference

@pytest.mark.parametrize("mode", ["gemv", "torch"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_linear_kernels_match_reference(mode, rows):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    lin = Int4Linear.from_weight(w, 32)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    lin.kernel_mode = mode
    assert lin._mode(x) == mode
    fast = lin(x).float()
    lin.kernel_mode = "reference"
    ref = lin(x).float()
    exact = x.float() @ dequantize(*quantize_groupwise(w, 32)).T
    assert torch.allclose(ref, exact, rtol=2e-2, atol=1e-2)
    assert (fast - exact).abs().max() <= 1e-2 * exact.abs().max()


def _logits_and_routes(model, x) -> tuple[torch.Tensor, torch.Tensor]:
    """model(x) -> (logits [B*T, V] as fp32, the experts every MoE layer chose [layers, B*T, k], sorted)."""
    from nanok2.moe import MoE

    routes = []
    hooks = [m.gate.register_forward_hook(lambda mod, inputs, out: routes.append(out[1].sort(-1).values))
             for m in model.modules() if isinstance(m, MoE)]   # the gate returns (weights, expert ids, scores)
    try:
        return model(x).float().flatten(0, 1), torch.stack(routes)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("targets", ["experts", "linear"])
def test_quantized_model_kernel_vs_reference_and_float(targets):
    """The INT4 kernels agree with the reference on every token that they route alike. Top-k routing is
    discontinuous: where two experts' scores nearly tie, any rounding difference (here the int8 activations
    of the gemv kernel) can flip the choice, and that token then moves by the gap between two experts'
    outputs. Such flips must stay rare (at most 1 token in 12); the tokens routed alike meet the tight bound."""
    torch.set_grad_enabled(False)
    try:
        model = tiny()
        x = ids()
        ref = model(x)
        qm = quantize_model(copy.deepcopy(model).to(torch.bfloat16), targets)
        n_int4 = sum(isinstance(m, Int4Linear) for m in qm.modules())
        assert n_int4 == (2 * 8 * 3 if targets == "experts" else 2 * 8 * 3 + 3 * 5 + 3 * 2 + 3)
        outs, routes = {}, {}
        for kernel in ("default", "torch", "reference"):  # default: gemv for the experts, torch's kernel for 24 rows
            if kernel != "default":
                set_int4_kernel(qm, kernel)
            outs[kernel], routes[kernel] = _logits_and_routes(qm, x)
        alike = (routes["default"] == routes["reference"]).all(-1).all(0) & \
            (routes["torch"] == routes["reference"]).all(-1).all(0)                # [B*T]
        assert int((~alike).sum()) <= alike.numel() // 12
        scale = ref.abs().max().item()
        for kernel in ("default", "torch"):
            assert (outs[kernel][alike] - outs["reference"][alike]).abs().max().item() < 0.02 * scale
        assert (outs["default"] - ref.flatten(0, 1)).abs().max().item() < 0.25 * scale   # INT4 + bf16 stays near
        assert isinstance(qm.model.layers[1].mlp.experts, Int4Experts)
    finally:
        torch.set_grad_enabled(True)


def test_int4_experts_grouped_matches_looped():
    model = tiny()
    qm = quantize_model(copy.deepcopy(model), "experts")
    moe = qm.model.layers[1].mlp
    xs = torch.randn(7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        w, idx, _ = moe.gate(xs)
        fast = grouped_experts(moe.experts, xs, idx, w)
        slow = looped_experts(moe.experts, xs, idx, w)
    assert torch.allclose(fast.float(), slow.float(), atol=2e-2 * slow.abs().max().item())


# ---------------------------------------------------------------- the gemv kernel's int8 activations
# The gemv kernel rounds activations to int8 in blocks of 32: s_b = max|x_b| / 127, x_i ~ s_b * round(x_i / s_b),
# so |error_i| <= s_b / 2 = max|x_b| / 254, and a dot product with a weight row w is off by at most
# sum_b max|x_b| / 254 * sum_{i in b} |w_i| (the products of q_w and q_x are then exact in int32; the scaling
# and the sum run in fp32). On Gaussian data the rounding errors are ~uniform in ±s_b/2 (std s_b / sqrt(12))
# and a block's max is ~2.4 std (RMS over blocks of 32), so the outputs' relative RMS error is
# ~2.4 / (127 sqrt(12)) = 0.55%.

def _kernel():
    k = gemv_kernel()
    if k is None:
        pytest.skip("no AVX2 int4 kernel on this machine")
    return k


def _random_int4(n, k, gs, seed):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_groupwise(torch.randn(n, k, generator=g) / k ** 0.5, gs)
    return pack_int4(q), scale, dequantize(q, scale, torch.float64)


def _int8_blocks(x):
    """x [M, K] fp32 as the kernel rounds it (fp32 scale arithmetic, round half to even), in fp64."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    return (torch.round(xb * (127 / amax)) * (amax / 127)).double().view(x.shape)


# K = 1024 and 2048: the 256-weight main loop; 320, 352, 96, 32: the leftover chunks and a lone block; group sizes
# 32, 64, 128, 256, 512 take their own scale paths, 96 the generic one; 1-9 and 16 rows every tile shape
@pytest.mark.parametrize("n, k, gs", [(64, 1024, 32), (13, 2048, 32), (9, 320, 32), (7, 352, 32), (5, 96, 32),
                                      (6, 32, 32), (8, 1024, 64), (8, 896, 128), (8, 768, 256), (8, 1536, 512),
                                      (8, 288, 96)])
def test_int4_gemv_is_exact_on_int8_activations(n, k, gs):
    kernel = _kernel()
    packed, scale, w = _random_int4(n, k, gs, seed=n + k + gs)
    for rows in (1, 2, 3, 4, 5, 6, 7, 9, 16):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        x[:, : k // 3] *= 20                                      # blocks of very different scales
        y = kernel.int4_linear(x, packed, scale, gs).double()
        emulated = _int8_blocks(x) @ w.T
        fp32_slack = 1e-5 * (_int8_blocks(x).abs() @ w.abs().T)  # fp32 scaling and summation only
        assert bool(((y - emulated).abs() <= fp32_slack).all()), (rows, (y - emulated).abs().max().item())


def test_int4_gemv_error_within_int8_bound():
    kernel = _kernel()
    packed, scale, w = _random_int4(256, 1024, 32, seed=3)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4))
    exact = x.double() @ w.T
    y = torch.cat([kernel.int4_linear(x[i:i + 16].contiguous(), packed, scale, 32) for i in range(0, 64, 16)]).double()
    bound = x.double().abs().view(64, 32, 32).amax(-1) @ w.abs().view(256, 32, 32).sum(-1).T / 254
    assert bool(((y - exact).abs() <= bound + 1e-5 * (x.double().abs() @ w.abs().T)).all())
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 0.002 < rel < 0.01, rel                                # ~0.5% (see above); 0 would mean no rounding


def test_int4_expert_and_moe_kernels_match_reference():
    """`int4_expert` (one expert, up to 16 rows) and `int4_moe` (a layer's routed experts, up to 4 tokens) against
    the dequantized reference. Two int8 roundings in a row, of x and of silu(gate) * up (~0.55% RMS each on
    Gaussian data, more on the heavier-tailed silu(gate) * up, whose block maxima are larger): ~1.2% RMS here."""
    torch.manual_seed(0)
    E, D, inter, k = 8, 512, 256, 3
    experts = Int4Experts(E, D, inter, 32)
    for mlp in experts:
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.set_quantized(*quantize_groupwise(torch.randn(lin.out_features, lin.in_features) / lin.in_features ** 0.5, 32))
    x = torch.randn(4, D)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(4)])
    w = torch.softmax(torch.randn(4, k), -1)
    with torch.no_grad():
        _kernel()
        fused = experts(x, idx, w)                                    # int4_moe
        one = experts.expert(2, x[:3])                                # int4_expert
        set_int4_kernel(experts, "reference")
        ref, ref_one = experts(x, idx, w), experts.expert(2, x[:3])
    for fast, slow in ((fused, ref), (one, ref_one)):
        assert ((fast - slow).norm() / slow.norm()).item() < 0.02


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("targets", ["experts", "linear"])
def test_checkpoint_names_config_and_compressed_tensors_decompressor(tmp_path, targets):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    model = tiny()
    qm = quantize_model(copy.deepcopy(model).to(torch.bfloat16), targets)
    save_quantized(qm, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == quantization_config(targets, 32)
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    if targets == "experts":
        assert qc["ignore"] == ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    pre = "model.layers.1.mlp.experts.3.gate_proj"
    assert tensors[f"{pre}.weight_packed"].dtype == torch.int32 and tensors[f"{pre}.weight_packed"].shape == (32, 8)
    assert tensors[f"{pre}.weight_scale"].dtype == torch.bfloat16 and tensors[f"{pre}.weight_scale"].shape == (32, 2)
    assert tensors[f"{pre}.weight_shape"].tolist() == [32, 64]
    assert f"{pre}.weight" not in tensors and "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    attn = "model.layers.0.self_attn.kv_b_proj"
    assert (f"{attn}.weight_packed" in tensors) == (targets == "linear")
    assert (f"{attn}.weight" in tensors) == (targets == "experts")

    # compressed-tensors' own model-free decompressor reads the files back to our dequantized weights
    ct = CompressedTensorsDequantizer(str(tmp_path / "q"), dtype=torch.bfloat16)
    dq = ct.process(dict(tensors))
    ours = {n: m.dequantized(torch.bfloat16) for n, m in qm.named_modules() if isinstance(m, Int4Linear)}
    assert len(ours) > 0
    for name, w in ours.items():
        assert torch.equal(dq[f"{name}.weight"], w), name
    assert not any(k.endswith(("weight_packed", "weight_scale", "weight_shape")) for k in dq)

    # and nanok2 loads it to the same model (kernel form rebuilt at load time)
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization_config == qc and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(ids()), qm(ids()))


def test_quantize_command(tmp_path):
    from nanok2.cli import main

    save_model(tiny(), tmp_path / "f", dtype="bfloat16")
    (tmp_path / "f" / "tiktoken.model").write_text("x")
    assert main(["quantize", "--model", str(tmp_path / "f"), "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "tiktoken.model").exists()
    loaded = load_model(tmp_path / "q")
    assert isinstance(loaded.model.layers[2].mlp.experts, Int4Experts)
    assert main(["quantize", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "q2")]) == 2   # already INT4


# ---------------------------------------------------------------- errors a user can cause

def test_bad_group_size_and_bit_width_name_the_tensor():
    with pytest.raises(NanoK2Error, match=r"model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight: group_size 64 "
                                          r"does not divide the input dimension 32"):
        quantize_model(tiny(), "experts", group_size=64)
    with pytest.raises(NanoK2Error, match="unsupported bit width 8"):
        quantize_groupwise(torch.randn(4, 32), 32, bits=8)
    with pytest.raises(NanoK2Error, match="unknown quantization targets"):
        quantize_model(tiny(), "attention")


def _write_quantized(tmp_path):
    qm = quantize_model(tiny().to(torch.bfloat16), "experts")
    return save_quantized(qm, tmp_path / "q")


def test_missing_scale_is_an_error_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _write_quantized(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight_scale"]
    save_file(tensors, str(path / "model.safetensors"))
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight_packed has no "
                                                  r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight_scale"):
            load_model(path, strict=strict)


@pytest.mark.parametrize("change, message", [
    (dict(num_bits=8), "num_bits=8: unsupported bit width"),
    (dict(symmetric=False), "only symmetric"),
    (dict(group_size=64), r"model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight_packed: group_size 64 does not divide "
                          r"the input dimension 32"),
])
def test_bad_quantization_config(tmp_path, change, message):
    path = _write_quantized(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


# ---------------------------------------------------------------- quantization-aware training

def test_qat_fake_quant_then_int4_is_lossless_and_trains():
    torch.manual_seed(0)
    model = tiny().train()
    params_before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert enable_qat(model, "experts") == 2
    assert {n: p for n, p in model.named_parameters()} == params_before    # same names, same Parameter objects
    x = ids(1, (2, 16))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert model.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0     # STE lets gradients through
        opt.step()
    model.eval()
    with torch.no_grad():
        fq = model(x)
        exp = model.model.layers[1].mlp.experts
        w_fq = fake_quant(exp.gate_up_proj, 32)
        assert disable_qat(model) == 2
        plain = model(x)
        assert not torch.equal(fq, plain)
        qm = tiny()
        qm.load_state_dict(model.state_dict())
        qm = quantize_model(qm, "experts")
        q = qm.model.layers[1].mlp.experts[0]
        assert torch.equal(q.gate_proj.dequantized(torch.float32), w_fq[0, :32])     # the trained weights quantize exactly
        set_int4_kernel(qm, "reference")
        assert torch.allclose(qm(x), fq, atol=1e-4)


def test_qat_linear_targets_swap_and_restore():
    model = tiny()
    n = enable_qat(model, "linear", 32)
    assert n == 2 + 3 * 5 + 3 * 2 + 3          # experts + attention + shared experts + dense MLP
    assert type(model.model.layers[0].self_attn.q_a_proj).__name__ == "FakeQuantLinear"
    assert type(model.lm_head) is torch.nn.Linear
    disable_qat(model)
    assert type(model.model.layers[0].self_attn.q_a_proj) is torch.nn.Linear


def test_qat_restores_a_swapped_in_subclass():
    class KernelLinear(torch.nn.Linear):     # as nanok2.cpu_kernels swaps in for the engine
        pass

    model = tiny()
    lin = model.model.layers[0].self_attn.o_proj
    lin.__class__ = KernelLinear
    enable_qat(model, "linear")
    assert type(lin).__name__ == "FakeQuantLinear"
    disable_qat(model)
    assert type(lin) is KernelLinear
