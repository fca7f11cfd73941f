"""`nanok2 bench train-step`: its report (speed is not asserted) and its refusal of a bad shape or share."""
import json
import subprocess
import sys


def test_bench_train_step_prints_table_then_json():
    r = subprocess.run([sys.executable, "-m", "nanok2.cli", "bench", "train-step", "--shapes", "1x32", "2x16",
                        "--repeat", "1", "--threads", "1", "--vocab", "512"], capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["batch", "x"]
    assert [line.split()[1] for line in lines[2:10]] == ["reference", "sdpa", "padded-sdpa", "padded-sdpa+scored"] * 2
    result = json.loads(lines[-1])
    assert result["bench"] == "train-step" and result["threads"] == 1 and result["trained_share"] == 0.34
    for shape in ("1x32", "2x16"):
        assert result[f"s_reference_{shape}"] > 0 and result[f"speedup_padded_sdpa_{shape}"] > 0
        assert result[f"speedup_scored_{shape}"] > 0 and result[f"s_padded_sdpa_scored_{shape}"] > 0


def test_bench_train_step_rejects_a_bad_shape_or_share():
    r = subprocess.run([sys.executable, "-m", "nanok2.cli", "bench", "train-step", "--shapes", "2by64"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "BATCHxSEQ_LEN" in r.stderr
    r = subprocess.run([sys.executable, "-m", "nanok2.cli", "bench", "train-step", "--trained-share", "0"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--trained-share 0.0 must be in (0, 1]" in r.stderr
