"""A least-recently-used cache with entries that can be kept for good (the service's and the detector's caches)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class LRU:
    """The ``size`` most recently used values, and those asked for with ``keep=True`` (never evicted, not
    counted in ``size``: e.g. what the server prepared at start for its examples, which a busy Space's uploads
    would otherwise push out). It has no lock of its own."""

    def __init__(self, size: int) -> None:
        self.size, self.items, self.kept = size, OrderedDict(), set()

    def get(self, key: Hashable, make: Callable[[], Any], keep: bool = False) -> Any:
        if keep:
            self.kept.add(key)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        evictable = [k for k in self.items if k not in self.kept]  # oldest first
        for old in evictable[: max(0, len(evictable) - self.size)]:
            del self.items[old]
        return value
