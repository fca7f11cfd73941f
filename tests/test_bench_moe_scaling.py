"""`nanok2 bench moe-scaling` runs end to end and ends with its JSON line (speed itself is not asserted)."""
import json
import subprocess
import sys


def test_moe_scaling_prints_table_then_json():
    r = subprocess.run([sys.executable, "-m", "nanok2.cli", "bench", "moe-scaling", "--experts", "4", "16",
                        "--hidden", "64", "--layers", "1", "--repeat", "2", "--threads", "1"],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["experts", "top-k"]
    result = json.loads(lines[-1])
    assert result["bench"] == "moe-scaling" and set(result) >= {"ms_4_experts", "ms_16_experts", "ratio_max_vs_min_experts"}
