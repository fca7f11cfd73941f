"""The embedded model, models/nanok2-agent-tiny: what the README's first command runs.

It must be a complete K2-Thinking-format INT4 checkpoint within the size budget, and, on a world it was
never trained on, it must really run the loop: think, call the tools with valid arguments and answer.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "models" / "nanok2-agent-tiny"


def test_the_checkpoint_is_k2_thinking_int4_and_small():
    files = {f.name for f in MODEL.iterdir()}
    assert {"config.json", "tiktoken.model", "tokenizer_config.json", "generation_config.json", "README.md"} <= files
    assert sum(f.stat().st_size for f in MODEL.iterdir() if f.name != "README.md") <= 25e6
    config = json.loads((MODEL / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert "chat_template" in json.loads((MODEL / "tokenizer_config.json").read_text())


def test_readme_first_command_runs_the_agent_on_an_unseen_world(tmp_path):
    """`nanok2 agent --task multihop` on world 1000 (training used seeds below 1000): the live view shows
    thinking, tool calls and the answer, and the answer is the gold one."""
    log = tmp_path / "run.jsonl"
    out = subprocess.run([sys.executable, "-m", "nanok2", "agent", "--task", "multihop", "--world", "1000",
                          "--log", str(log)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Exact Answer:" in out.stdout and "(correct;" in out.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    calls = [c for r in steps for c in r["tool_calls"]]
    assert calls and all(c["valid"] for c in calls)
    assert all(r["reasoning"] for r in steps)
    assert records[-1]["kind"] == "final" and records[-1]["stop_reason"] == "final"


@pytest.mark.parametrize("family", ["multihop", "trail"])
def test_eval_world_reports_json_for_the_embedded_model(family):
    out = subprocess.run([sys.executable, "-m", "nanok2", "eval", "world", "--seed", "1001", "--family", family,
                          "--n", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["valid_tool_call_rate"] >= 0.9 and summary["completed"] == 1.0
