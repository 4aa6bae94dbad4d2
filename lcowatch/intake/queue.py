"""The queue between admission and the worker: complete files, earliest observation first.

It holds paths (and their size, mtime and observation time), never frames, so memory stays flat with the
backlog.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(order=True)
class QueueItem:
    """A complete file waiting for the worker: only its path and what identifies its content."""

    key: tuple[bool, float, str]
    path: Path = field(compare=False)
    size: int = field(compare=False)
    mtime_ns: int = field(compare=False)


def queue_key(path: Path, mjd: float | None) -> tuple[bool, float, str]:
    """Observation time order (as :meth:`Pipeline.unseen`); files without a time first."""
    return (mjd is not None, mjd or 0.0, str(path))


class WorkQueue:
    """A thread-safe priority queue of paths, earliest observation first, each path at most once."""

    def __init__(self) -> None:
        self._heap: list[QueueItem] = []
        self._members: set[Path] = set()
        self._cond = threading.Condition()
        self._closed = False

    def push_many(self, items: Sequence[QueueItem]) -> None:
        """Add a batch at once, so the worker never starts on a batch half pushed."""
        with self._cond:
            for item in items:
                if item.path not in self._members:
                    self._members.add(item.path)
                    heapq.heappush(self._heap, item)
            self._cond.notify_all()

    def pop(self, timeout: float) -> QueueItem | None:
        with self._cond:
            if not self._heap and not self._closed:
                self._cond.wait(timeout)
            if not self._heap or self._closed:
                return None
            item = heapq.heappop(self._heap)
            self._members.discard(item.path)
            return item

    def upcoming(self, count: int) -> list[Path]:
        """The next ``count`` paths in their order, left in the queue."""
        with self._cond:
            return [item.path for item in heapq.nsmallest(count, self._heap)]

    def close(self) -> None:
        """Wake the worker and give it nothing more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __contains__(self, path: object) -> bool:
        with self._cond:
            return path in self._members

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)
