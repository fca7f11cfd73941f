"""Weights moved into a huge-page mapping keep their values, names and modules, and the mapping outlives the call."""
import gc

import pytest
import torch

from nanok2.config import ModelArgs
from nanok2.huge_pages import HUGE_PAGE, huge_pages_available, move_to_huge_pages
from nanok2.model import build_model

pytestmark = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on this OS")


def test_weights_move_into_one_mapping_and_the_model_computes_the_same():
    model = build_model(ModelArgs.from_preset("tiny"), seed=0, dtype=torch.bfloat16).eval()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        want = model(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    big = {k for k, v in before.items() if v.numel() * v.element_size() >= 4096}
    moved = move_to_huge_pages(model, min_bytes=4096)
    gc.collect()                                            # the mapping is held by the tensors alone
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(model.get_parameter(k) is p for k, p in params.items())   # same Parameter objects, new storage
    assert moved == sum(before[k].numel() * before[k].element_size() for k in big)
    ptrs = sorted(after[k].data_ptr() for k in big)
    assert ptrs[0] % HUGE_PAGE == 0                         # the first starts on a huge page
    assert ptrs[-1] - ptrs[0] < moved + 64 * len(ptrs)      # all in one region, packed
    with torch.no_grad():
        assert torch.equal(model(ids), want)


def test_nothing_to_move_is_zero():
    model = build_model(ModelArgs.from_preset("tiny"), seed=0).eval()
    assert move_to_huge_pages(model, min_bytes=1 << 40) == 0


def test_a_second_move_leaves_the_weights_where_they_are():
    model = build_model(ModelArgs.from_preset("tiny"), seed=0).eval()
    assert move_to_huge_pages(model, min_bytes=4096) > 0
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model, min_bytes=4096) == 0
    assert [p.data_ptr() for p in model.parameters()] == ptrs
