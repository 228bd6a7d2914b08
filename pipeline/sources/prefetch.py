"""Bounded, ordered read-ahead: keep a few reads in flight while the consumer works on earlier results."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_prefetch(pool: Executor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``map(fn, items)`` in order, with at most ``ahead`` calls running or finished but not yet consumed.

    Unlike ``Executor.map``, which submits everything at once, memory stays bounded by ``ahead`` results.
    An exception from ``fn`` is raised when its result is reached; calls already submitted are cancelled.
    """
    if ahead < 1:
        raise ValueError("ahead must be at least 1")
    it = iter(items)
    window: deque = deque()
    try:
        for item in it:
            window.append(pool.submit(fn, item))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for future in window:
            future.cancel()


_END = object()


def background(items: Iterator[T], maxsize: int) -> Iterator[T]:
    """Run ``items`` in its own thread, up to ``maxsize`` results ahead of the consumer.

    A streaming source (a tar read front to back) then keeps reading while the model works.
    The producer's exception is raised to the consumer in order; a consumer that stops early
    stops the producer at its next result.
    """
    box: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_END, e))
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    thread = threading.Thread(target=produce, name="segpipe-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
