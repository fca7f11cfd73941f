"""`nanok2 bench copy`: its task (a span repeated at a random offset) and its report (learning speed is not asserted)."""
import json
import subprocess
import sys

import torch

from nanok2.bench.copy import copy_batch, first_step_below


def test_copy_batch_repeats_a_span_and_masks_exactly_the_copy():
    g = torch.Generator().manual_seed(0)
    x, mask = copy_batch(g, batch=32, window=24, span=6, symbols=50)
    assert x.shape == (32, 24) and mask.shape == (32, 23)
    assert int(x.min()) >= 0 and int(x.max()) < 50
    starts = set()
    for row, m in zip(x.tolist(), mask):
        where = m.nonzero().flatten().tolist()
        assert len(where) == 5 and where == list(range(where[0], where[0] + 5))
        p2 = where[0]                                   # predictions at p2 .. p2+4 are of the copy's tokens 2..6
        assert any(row[p1:p1 + 6] == row[p2:p2 + 6] for p1 in range(0, p2 - 5))
        starts.add(p2)
    assert len(starts) > 5                              # random offsets


def test_first_step_below():
    assert first_step_below([(25, 5.0), (50, 2.0), (75, 1.0)], 2.5) == 50
    assert first_step_below([(25, 5.0)], 2.5) is None


def test_bench_copy_prints_table_then_json():
    # in a subprocess: the bench sets torch's thread count for its whole process
    r = subprocess.run([sys.executable, "-m", "nanok2.cli", "bench", "copy", "--steps", "4", "--every", "2",
                        "--symbols", "16", "--window", "16", "--span", "3", "--batch", "4",
                        "--model", "hidden_size=32", "num_hidden_layers=2"], capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert lines[1].split() == ["step", "agent-tiny", "wide-attention"]
    result = json.loads(lines[-1])
    assert result["bench"] == "copy" and result["chance"] == round(float(torch.log(torch.tensor(16.0))), 3)
    assert set(result) >= {"final_copy_loss_agent_tiny", "final_copy_loss_wide_attention",
                           "steps_to_half_chance_agent_tiny", "steps_to_half_chance_wide_attention"}
