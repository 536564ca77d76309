"""The latency line of report.md: a ratio with its spread from interleaved rounds, left out when
the spread is wider than the effect. A scripted clock stands in for the machine, so the rule is
tested, not this machine's speed."""

from reconfx.report import latency_line
from reconfx.timing import Ratio, interleaved_ratio


class ScriptedClock:
    """``clock()`` for interleaved_ratio: each call of ``a`` or ``b`` advances it by the next
    duration that side's script gives (cycled)."""

    def __init__(self, a, b):
        self.now, self.scripts, self.calls = 0.0, {"a": a, "b": b}, {"a": 0, "b": 0}

    def __call__(self):
        return self.now

    def call(self, side):
        script = self.scripts[side]
        self.now += script[self.calls[side] % len(script)]
        self.calls[side] += 1


def measure(a, b, rounds=15):
    clock = ScriptedClock(a, b)
    return interleaved_ratio(lambda: clock.call("a"), lambda: clock.call("b"), rounds=rounds,
                             block_s=0.0, clock=clock), clock


def test_a_clear_slowdown_is_reported_with_its_quartiles():
    ratio, clock = measure([0.002, 0.0022, 0.0021], [0.004, 0.0043, 0.0041])
    assert clock.calls == {"a": 16, "b": 16}  # a warm-up call each, then 15 rounds of one call
    assert 1.8 < ratio.median < 2.2 and ratio.low <= ratio.median <= ratio.high
    assert ratio.clear
    line = latency_line(ratio)
    assert line.startswith("- eval latency (example inputs, 15 interleaved rounds): ")
    assert f"x{ratio.median:.2f} (quartiles x{ratio.low:.2f}-x{ratio.high:.2f})" in line


def test_noise_wider_than_the_effect_is_not_reported():
    # The same work on both sides, each round disturbed differently (a slow phase of the
    # machine catching one side): the ratios straddle 1 more widely than they differ from it.
    ratio, _ = measure([0.002, 0.003, 0.002, 0.0019], [0.0025, 0.002, 0.0021, 0.003])
    assert not ratio.clear
    assert latency_line(ratio).startswith(
        "- eval latency: not reported: the compiled/original time ratio varied x")
    assert "more than its median" in latency_line(ratio)


def test_the_rule():
    assert Ratio(1, 2, median=1.5, low=1.4, high=1.6, rounds=15).clear
    assert not Ratio(1, 1, median=1.05, low=0.9, high=1.2, rounds=15).clear


def test_slow_calls_get_fewer_rounds_within_the_budget():
    # A forward pass of seconds (a billion-parameter model on a CPU): 15 rounds would take
    # minutes, so the rounds shrink to the 20 s budget, and never below 3.
    ratio, clock = measure([2.0], [3.0])
    assert ratio.rounds == 4 and clock.calls == {"a": 5, "b": 5}
    assert ratio.median == 1.5
    ratio, clock = measure([30.0], [30.0])
    assert ratio.rounds == 3 and clock.calls == {"a": 4, "b": 4}
