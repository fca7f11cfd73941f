"""The sampling maths as pure functions: greedy, temperature, top-k, top-p, min-p, seeds, parameter checks."""
import math

import pytest
import torch

from nanok2.errors import NanoK2Error
from nanok2.sampling import (SamplingParams, filtered_logits, make_generator, min_p_filter, next_token, top_k_filter,
                             top_p_filter)

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x).nonzero().flatten().tolist()


def test_greedy_is_argmax():
    logits = torch.randn(100)
    assert next_token(logits, SamplingParams(temperature=0)) == int(logits.argmax())


def test_top_k_keeps_the_k_largest():
    assert kept(top_k_filter(LOGITS, 2)) == [0, 1]
    assert kept(top_k_filter(LOGITS, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(LOGITS, 10)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(top_p_filter(LOGITS, 0.5)) == [0]          # 0.5 alone reaches 0.5
    assert kept(top_p_filter(LOGITS, 0.6)) == [0, 1]
    assert kept(top_p_filter(LOGITS, 0.86)) == [0, 1, 2, 3]
    assert kept(top_p_filter(LOGITS, 0.01)) == [0]         # the most likely token always stays
    shuffled = LOGITS[torch.tensor([3, 0, 4, 2, 1])]       # order of the vocabulary does not matter
    assert kept(top_p_filter(shuffled, 0.6)) == [1, 4]


def test_min_p_is_relative_to_the_most_likely():
    assert kept(min_p_filter(LOGITS, 0.3)) == [0, 1, 2]    # p >= 0.15
    assert kept(min_p_filter(LOGITS, 0.0)) == [0, 1, 2, 3, 4]


def test_temperature_sharpens_and_flattens():
    p_cold = filtered_logits(LOGITS, SamplingParams(temperature=0.5)).softmax(-1)
    p_hot = filtered_logits(LOGITS, SamplingParams(temperature=2.0)).softmax(-1)
    assert p_cold[0] > 0.5 > p_hot[0]
    torch.testing.assert_close(filtered_logits(LOGITS, SamplingParams(temperature=1.0)).softmax(-1), LOGITS.exp())


def test_draws_follow_the_filtered_distribution():
    g = make_generator(0)
    params = SamplingParams(temperature=1.0, top_k=2)
    draws = [next_token(LOGITS, params, g) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.7) < 0.05


def test_seed_makes_draws_reproducible():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = [next_token(logits, params, g) for g in [make_generator(7)] for _ in range(20)]
    b = [next_token(logits, params, g) for g in [make_generator(7)] for _ in range(20)]
    c = [next_token(logits, params, g) for g in [make_generator(8)] for _ in range(20)]
    assert a == b and a != c


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1),
                                 dict(max_tokens=0), dict(thinking_budget=-1), dict(stop=[""])])
def test_invalid_parameters_are_named(bad):
    name = next(iter(bad))
    with pytest.raises(NanoK2Error, match=name):
        SamplingParams(**bad).validate()


def test_filters_never_remove_everything():
    flat = torch.zeros(8)
    for x in (top_k_filter(flat, 3), top_p_filter(flat, 0.1), min_p_filter(flat, 1.0)):
        assert math.isfinite(float(x.max()))
