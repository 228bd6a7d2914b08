"""Read-ahead helpers: order kept, memory bounded, errors delivered, producers stopped."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.sources.prefetch import background, ordered_prefetch


def test_ordered_prefetch_keeps_order_and_bounds_what_is_in_flight():
    started: list[int] = []
    lock = threading.Lock()

    def fetch(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * (i % 3))  # finish out of order
        return i * 10

    with ThreadPoolExecutor(8) as pool:
        results = ordered_prefetch(pool, fetch, range(50), ahead=4)
        first = next(results)
        # Only the window was submitted before the first result was handed out.
        assert first == 0 and len(started) <= 4
        assert [first, *results] == [i * 10 for i in range(50)]


def test_ordered_prefetch_raises_at_the_failing_item_and_cancels_the_rest():
    def fetch(i: int) -> int:
        if i == 5:
            raise ConnectionResetError("gone")
        return i

    with ThreadPoolExecutor(2) as pool:
        got = []
        with pytest.raises(ConnectionResetError):
            for x in ordered_prefetch(pool, fetch, range(100), ahead=3):
                got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_background_runs_ahead_but_no_further_than_maxsize():
    produced: list[int] = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    items = background(source(), maxsize=5)
    assert next(items) == 0
    time.sleep(0.2)  # let the producer run as far as the queue allows
    assert 5 <= len(produced) <= 7  # queue of 5, plus one waiting to be put, plus the one consumed
    assert list(items) == list(range(1, 100))


def test_background_hands_the_producer_error_to_the_consumer_in_order():
    def source():
        yield 1
        yield 2
        raise OSError("storage went away")

    got = []
    with pytest.raises(OSError, match="storage went away"):
        for x in background(source(), maxsize=1):
            got.append(x)
    assert got == [1, 2]


def test_background_stops_and_closes_the_producer_when_the_consumer_stops():
    closed = threading.Event()

    def source():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    items = background(source(), maxsize=2)
    assert next(items) == 0
    items.close()  # the consumer gives up (e.g. its shard failed)
    assert closed.wait(timeout=5)
