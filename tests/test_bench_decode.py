"""The decode and quant benches report the median of their interleaved rounds, not the best one."""
from nanok2.bench.decode import median_by_speed


def test_the_median_round_is_reported():
    rounds = [{"decode_tok_s": v, "round": i} for i, v in enumerate([110.0, 92.0, 99.0, 105.0, 97.0])]
    assert median_by_speed(rounds)["round"] == 2          # 99: two rounds below it, two above
    assert median_by_speed(rounds[:4])["decode_tok_s"] == 99.0   # even count: the lower middle one
    assert median_by_speed(rounds[:1])["round"] == 0
