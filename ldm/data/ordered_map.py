"""``map`` over worker processes with results in input order and bounded memory (the shard tools'
parallel driver: encoding in images_to_shards, shard reading in inspect_shards)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _map_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, chunk_size: int = 16) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes, results in input order, bounded memory.

    At most ``4 * workers`` chunks are in flight, so neither the input nor the results pile up.
    ``workers <= 1`` maps in this process. ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers)
    try:
        pending: deque = deque()
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == chunk_size:
                pending.append(pool.submit(_map_chunk, fn, chunk))
                chunk = []
                if len(pending) >= 4 * workers:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(pool.submit(_map_chunk, fn, chunk))
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
