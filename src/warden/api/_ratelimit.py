"""Keyed token-bucket rate limiting for the hub's HTTP API: thread-safe, memory-bounded, pure stdlib.

Each key (a client address, a device id, an account...) owns a bucket of at most ``burst`` tokens that refills at
``rate`` tokens per second; a request costs tokens and is refused, with the number of seconds to wait, when the bucket
does not hold enough. At most ``max_keys`` buckets are kept: when a new key arrives at the limit, the least recently
used bucket is forgotten. Forgetting is harmless for the bound: a forgotten key that comes back starts with a full
bucket, exactly as a key never seen before would, so an attacker who floods the limiter with fresh keys to push out
their own drained bucket gains at most one ``burst`` -- which they could get anyway by using a new key. Size
``max_keys`` so that legitimate active clients fit; evictions then only ever concern idle or throw-away keys.

Every call is O(1): a lock, one ``OrderedDict`` lookup/move and a little arithmetic. Per key only a two-slot object
is stored (plus the key and the dictionary's own bookkeeping).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

__all__ = ["MultiLimiter", "RateLimiter"]

# The smallest retry-after ever returned for a refusal, so that "refused" is never reported as 0.0 (= allowed) when
# the shortfall is a rounding-error away from zero.
_MIN_RETRY_AFTER = 1e-6


class _Bucket:
    """The state of one key: tokens held at time ``stamp`` (in the limiter's clock)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """A keyed token bucket: ``rate`` tokens per second, capacity ``burst``, at most ``max_keys`` keys (LRU).

    ``clock`` returns seconds as a float and must not go backwards much (``time.monotonic`` by default); a clock that
    steps back simply refills nothing until it catches up.

    A ``cost`` must satisfy ``0 < cost <= burst``: a larger cost could never be paid, so :meth:`take` raises
    ``ValueError`` for it instead of returning a retry-after that would be a lie.
    """

    __slots__ = ("_buckets", "_burst", "_clock", "_lock", "_max_keys", "_rate")

    def __init__(self, *, rate: float, burst: int, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive finite number of tokens per second, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        self._rate = float(rate)
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Capacity of each bucket (and the tokens a new key starts with)."""
        return self._burst

    @property
    def max_keys(self) -> int:
        """The most keys held at once."""
        return self._max_keys

    def __len__(self) -> int:
        """The number of keys currently held (never more than ``max_keys``)."""
        with self._lock:
            return len(self._buckets)

    def _check_cost(self, cost: float) -> None:
        # Written so that NaN fails too.
        if not (0 < cost <= self._burst):
            raise ValueError(f"cost must satisfy 0 < cost <= burst ({self._burst}), got {cost!r}")

    def take(self, key: str, cost: float = 1.0) -> float:
        """Try to take ``cost`` tokens from ``key``'s bucket.

        Returns 0.0 when allowed (the tokens are consumed), otherwise the number of seconds (> 0) until ``cost``
        tokens will be available, consuming nothing. Raises ``ValueError`` unless ``0 < cost <= burst``.
        """
        self._check_cost(cost)
        buckets = self._buckets
        with self._lock:
            now = self._clock()
            bucket = buckets.get(key)
            if bucket is None:
                if len(buckets) >= self._max_keys:
                    buckets.popitem(last=False)
                # A new key starts full, and cost <= burst: always allowed.
                buckets[key] = _Bucket(self._burst - cost, now)
                return 0.0
            buckets.move_to_end(key)
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
                bucket.stamp = now
            if bucket.tokens >= cost:
                bucket.tokens -= cost
                return 0.0
            return max((cost - bucket.tokens) / self._rate, _MIN_RETRY_AFTER)

    def refund(self, key: str, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens previously taken from ``key`` (capped at ``burst``).

        Does nothing if the key has been evicted meanwhile (it would start full anyway). Does not change the key's
        recency. Raises ``ValueError`` unless ``0 < cost <= burst``.
        """
        self._check_cost(cost)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.tokens = min(self._burst, bucket.tokens + cost)


class MultiLimiter:
    """Several named limiters checked together, e.g. per client address, per device and global.

    ``limiters`` is an ordered collection of ``(name, RateLimiter)`` pairs (or a mapping name -> limiter); they are
    consulted in that order. :meth:`check` takes tokens from each limiter named in ``keys`` for the key given there;
    if one refuses, the tokens already taken from the earlier limiters in the same call are refunded, so a refused
    request costs nothing anywhere. (Take and refund are not one atomic step across limiters: a concurrent request may
    briefly see the earlier buckets lower than they end up -- it errs on the side of refusing.)
    """

    __slots__ = ("_limiters",)

    def __init__(self, limiters: Mapping[str, RateLimiter] | Iterable[tuple[str, RateLimiter]]) -> None:
        pairs = list(limiters.items()) if isinstance(limiters, Mapping) else list(limiters)
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"limiter names must be unique, got {names!r}")
        self._limiters: tuple[tuple[str, RateLimiter], ...] = tuple(pairs)

    @property
    def names(self) -> tuple[str, ...]:
        """The limiter names, in checking order."""
        return tuple(name for name, _ in self._limiters)

    def check(self, keys: Mapping[str, str], cost: float = 1.0) -> tuple[str, float] | None:
        """Take ``cost`` tokens from every limiter named in ``keys``, for the key mapped to its name.

        Limiters whose name is absent from ``keys`` are skipped (e.g. a per-account limit for an anonymous request);
        a name in ``keys`` that matches no limiter raises ``KeyError`` (a programming error, not a client's).
        Returns None when all allowed, else ``(name of the first limiter that refused, retry_after seconds)``, with
        the tokens taken earlier in this call refunded.
        """
        unknown = set(keys).difference(name for name, _ in self._limiters)
        if unknown:
            raise KeyError(f"no limiter named {sorted(unknown)!r}")
        taken: list[tuple[RateLimiter, str]] = []
        for name, limiter in self._limiters:
            key = keys.get(name)
            if key is None:
                continue
            retry_after = limiter.take(key, cost)
            if retry_after > 0:
                for earlier, earlier_key in reversed(taken):
                    earlier.refund(earlier_key, cost)
                return name, retry_after
            taken.append((limiter, key))
        return None
