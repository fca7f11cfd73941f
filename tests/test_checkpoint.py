"""Checkpoints in and out: sharding, dtype, and a clear error for every kind of bad input."""
import json
import subprocess
import sys

import pytest
import torch

from nanok2 import CheckpointError, ConfigError, ModelArgs, build_model, load_model, save_model
from nanok2.checkpoint import parse_size


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = build_model(ModelArgs.from_preset("tiny"), seed=7)
    save_model(model, path)
    return model, path


def test_roundtrip_bf16_and_sharded(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path, max_shard_size="100KB", dtype="bfloat16")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.gate_up_proj.bfloat16())
    as_fp32 = load_model(tmp_path, dtype="float32")
    assert as_fp32.lm_head.weight.dtype == torch.float32


def test_shape_mismatch_names_tensor_and_shapes(saved, tmp_path):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn." in msg and "has shape (32,) but the config expects (48,)" in msg


def test_missing_and_unexpected_tensors_are_listed(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    tensors["model.layers.9.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "1 missing tensor(s): model.layers.2.mlp.experts.5.up_proj.weight" in msg
    assert "1 unexpected tensor(s): model.layers.9.self_attn.extra.weight" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_file_is_a_clear_error(saved, tmp_path, damage):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    data = {"truncate": data[: len(data) // 2], "garbage": b"\x13\x00\x00\x00\x00\x00\x00\x00{not json" + data[:100],
            "empty": b""}[damage]
    (tmp_path / "model.safetensors").write_bytes(data)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert "model.safetensors" in str(e.value)


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a K2"):
        load_model(tmp_path)
    ModelArgs.from_preset("tiny").save_hf_config(tmp_path)
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(tmp_path)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_preset("kimi-k3")
    assert "kimi-k2-thinking" in str(e.value) and "tiny" in str(e.value)


def test_inconsistent_config_is_rejected():
    with pytest.raises(ConfigError, match="n_group"):
        ModelArgs.from_preset("tiny", n_group=3)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelArgs.from_preset("tiny", num_experts_per_tok=9)


def test_hf_config_roundtrip_for_every_preset():
    from nanok2.config import PRESETS
    for name in PRESETS:
        args = ModelArgs.from_preset(name)
        assert ModelArgs.from_hf_config(args.to_hf_config()) == args, name


def test_reads_transformers_v5_rope_parameters():
    cfg = ModelArgs.from_preset("tiny-yarn").to_hf_config()
    rs = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": rs.pop("type"), **rs}
    assert ModelArgs.from_hf_config(cfg) == ModelArgs.from_preset("tiny-yarn")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123


def test_cli_errors_have_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    for argv in (["info", "--preset", "nope"], ["info", "--model", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "nanok2.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and "error:" in r.stderr


def test_info_json_for_the_1t_preset():
    r = subprocess.run([sys.executable, "-m", "nanok2.cli", "info", "--preset", "kimi-k2-thinking", "--json"],
                       capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["total_params"] == 1026408209408 and out["active_params"] == 32861477888
    assert out["kv_cache_numbers_per_token_per_layer"] == 576


def test_loading_streams_with_peak_memory_near_the_weights(tmp_path):
    # ~64 MB of fp32 weights; peak RSS growth while loading must stay well under 2x (no full copy in memory)
    args = ModelArgs.from_preset("tiny", hidden_size=256, moe_intermediate_size=256, n_routed_experts=32,
                                 num_hidden_layers=6, vocab_size=4096, intermediate_size=512)
    save_model(build_model(args), tmp_path)
    weights = (tmp_path / "model.safetensors").stat().st_size
    code = ("import resource, torch, nanok2; from nanok2.checkpoint import load_model;"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"m = load_model({str(tmp_path)!r});"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(r.stdout.strip())
    assert growth < 1.6 * weights, (growth, weights)
