"""The keyed token bucket and its multi-limiter, on a fake clock: no sleeps, no timing assertions."""

from __future__ import annotations

import threading

import pytest

from warden.api._ratelimit import MultiLimiter, RateLimiter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, *, rate: float = 2.0, burst: int = 5, max_keys: int = 100) -> RateLimiter:
    return RateLimiter(rate=rate, burst=burst, max_keys=max_keys, clock=clock)


def test_burst_allowed_then_refused_with_retry_after() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=2.0, burst=5)
    assert [lim.take("a") for _ in range(5)] == [0.0] * 5
    retry = lim.take("a")
    assert retry == pytest.approx(0.5)  # one token at 2 tokens/s
    # Refusal consumes nothing: asking again at the same instant gives the same answer.
    assert lim.take("a") == pytest.approx(0.5)
    assert lim.take("a", cost=3) == pytest.approx(1.5)


def test_retry_after_is_exact_on_the_clock() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=4.0, burst=2)
    lim.take("a", 2)
    retry = lim.take("a")
    assert retry > 0
    clock.advance(retry / 2)
    assert lim.take("a") > 0
    clock.advance(retry)
    assert lim.take("a") == 0.0


def test_refill_over_time_capped_at_burst() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=3)
    for _ in range(3):
        assert lim.take("a") == 0.0
    assert lim.take("a") > 0
    clock.advance(2.0)
    assert lim.take("a") == 0.0
    assert lim.take("a") == 0.0
    assert lim.take("a") == pytest.approx(1.0)
    clock.advance(3600.0)  # a long idle period refills to burst, not beyond
    assert [lim.take("a") for _ in range(3)] == [0.0] * 3
    assert lim.take("a") == pytest.approx(1.0)


def test_fractional_costs() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=1)
    assert lim.take("a", 0.25) == 0.0
    assert lim.take("a", 0.75) == 0.0
    assert lim.take("a", 0.5) == pytest.approx(0.5)


def test_clock_going_backwards_refills_nothing() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=1)
    assert lim.take("a") == 0.0
    clock.advance(-10.0)
    assert lim.take("a") == pytest.approx(1.0)
    clock.advance(11.0)  # back to the original stamp + 1 s
    assert lim.take("a") == 0.0


@pytest.mark.parametrize("cost", [6, 5.0001, 0, -1, float("nan"), float("inf")])
def test_unpayable_or_nonsense_cost_raises(cost: float) -> None:
    lim = limiter(FakeClock(), burst=5)
    with pytest.raises(ValueError, match="cost"):
        lim.take("a", cost)
    with pytest.raises(ValueError, match="cost"):
        lim.refund("a", cost)
    assert len(lim) == 0


def test_cost_equal_to_burst_is_allowed() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=5)
    assert lim.take("a", 5) == 0.0
    assert lim.take("a", 5) == pytest.approx(5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0, "burst": 1, "max_keys": 1},
        {"rate": -1.0, "burst": 1, "max_keys": 1},
        {"rate": float("nan"), "burst": 1, "max_keys": 1},
        {"rate": float("inf"), "burst": 1, "max_keys": 1},
        {"rate": 1.0, "burst": 0, "max_keys": 1},
        {"rate": 1.0, "burst": 1.5, "max_keys": 1},
        {"rate": 1.0, "burst": True, "max_keys": 1},
        {"rate": 1.0, "burst": 1, "max_keys": 0},
    ],
)
def test_invalid_construction(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_keys_are_independent() -> None:
    clock = FakeClock()
    lim = limiter(clock, burst=2)
    assert lim.take("a") == 0.0
    assert lim.take("a") == 0.0
    assert lim.take("a") > 0
    assert lim.take("b") == 0.0
    assert lim.take("b") == 0.0
    assert lim.take("b") > 0
    assert len(lim) == 2


def test_memory_bound_with_a_million_keys() -> None:
    lim = RateLimiter(rate=1.0, burst=1, max_keys=10_000, clock=FakeClock())
    take = lim.take
    for i in range(1_000_000):
        take(str(i))
    assert len(lim) <= 10_000
    assert len(lim) == 10_000


def test_lru_keeps_recently_used_keys() -> None:
    # Frozen clock, burst 1: a drained (retained) key is refused, a forgotten one starts full and is allowed.
    lim = limiter(FakeClock(), rate=1.0, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert lim.take(key) == 0.0
    assert lim.take("a") > 0  # refused, but still a use: order is now b, c, a
    assert lim.take("d") == 0.0  # evicts the least recently used, "b": c, a, d
    assert len(lim) == 3
    assert lim.take("a") > 0  # survived with its drained bucket: c, d, a
    assert lim.take("b") == 0.0  # was forgotten, starts full; evicts "c": d, a, b
    assert lim.take("c") == 0.0  # forgotten too
    assert len(lim) == 3


def test_lru_recent_key_survives_a_flood() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=1, max_keys=10)
    assert lim.take("victim") == 0.0
    for i in range(1_000):
        assert lim.take(f"flood{i}") == 0.0
        if i % 5 == 0:
            assert lim.take("victim") > 0  # kept recent, so it keeps its drained bucket
    assert len(lim) == 10
    assert lim.take("flood0") == 0.0  # long evicted: starts full


def test_eviction_gives_at_most_a_fresh_bucket() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=3, max_keys=2)
    for _ in range(3):
        assert lim.take("a") == 0.0
    lim.take("x")
    lim.take("y")  # "a" evicted
    assert [lim.take("a") for _ in range(3)] == [0.0] * 3  # exactly one fresh burst
    assert lim.take("a") > 0


def test_threads_on_one_key_get_exactly_burst() -> None:
    lim = RateLimiter(rate=1.0, burst=500, max_keys=10, clock=FakeClock())  # frozen clock: no refill
    allowed = [0] * 8
    start = threading.Barrier(len(allowed))

    def hammer(slot: int) -> None:
        start.wait()
        for _ in range(1_000):
            if lim.take("shared") == 0.0:
                allowed[slot] += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(len(allowed))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 500


def test_refund_caps_at_burst_and_ignores_unknown_keys() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=2)
    lim.take("a")
    lim.refund("a")
    lim.refund("a")
    assert [lim.take("a") for _ in range(2)] == [0.0, 0.0]
    assert lim.take("a") > 0
    lim.refund("ghost")
    assert len(lim) == 1


def test_multi_all_allowed() -> None:
    clock = FakeClock()
    ip, dev = limiter(clock, burst=2), limiter(clock, burst=2)
    multi = MultiLimiter([("ip", ip), ("device", dev)])
    assert multi.names == ("ip", "device")
    assert multi.check({"ip": "10.0.0.1", "device": "d1"}) is None
    assert multi.check({"ip": "10.0.0.1", "device": "d1"}) is None
    refused = multi.check({"ip": "10.0.0.1", "device": "d1"})
    assert refused is not None
    assert refused[0] == "ip"
    assert refused[1] == pytest.approx(0.5)


def test_multi_refunds_earlier_limiters() -> None:
    clock = FakeClock()
    ip = limiter(clock, rate=1.0, burst=3)
    dev = limiter(clock, rate=1.0, burst=1)
    multi = MultiLimiter({"ip": ip, "device": dev})
    assert multi.check({"ip": "10.0.0.1", "device": "d1"}) is None
    for _ in range(5):
        refused = multi.check({"ip": "10.0.0.1", "device": "d1"})
        assert refused is not None
        assert refused[0] == "device"
        assert refused[1] == pytest.approx(1.0)
    # The refusals cost the ip bucket nothing: 2 of its 3 tokens are left.
    assert ip.take("10.0.0.1") == 0.0
    assert ip.take("10.0.0.1") == 0.0
    assert ip.take("10.0.0.1") > 0


def test_multi_skips_absent_names_and_rejects_unknown_ones() -> None:
    clock = FakeClock()
    ip, account = limiter(clock, burst=1), limiter(clock, burst=1)
    multi = MultiLimiter([("ip", ip), ("account", account)])
    assert multi.check({"ip": "10.0.0.1"}) is None
    assert len(account) == 0
    with pytest.raises(KeyError, match="typo"):
        multi.check({"typo": "x"})
    assert len(ip) == 1


def test_multi_rejects_duplicate_names() -> None:
    lim = limiter(FakeClock())
    with pytest.raises(ValueError, match="unique"):
        MultiLimiter([("a", lim), ("a", lim)])
