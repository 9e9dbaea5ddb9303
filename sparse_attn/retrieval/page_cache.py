"""A bounded least-recently-used cache of SSD pages held in RAM."""
from __future__ import annotations

from collections import OrderedDict
from ..errors import InvalidArgumentError


class PageCache:
    """Maps a page slot to its decoded tensor; keeps at most ``capacity`` pages, dropping the least recently used."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise InvalidArgumentError(f"cache_pages must be >= 0, got {capacity}")
        self.capacity = capacity
        self._pages: OrderedDict[int, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, slot: int):
        page = self._pages.get(slot)
        if page is None:
            self.misses += 1
            return None
        self.hits += 1
        self._pages.move_to_end(slot)
        return page

    def put(self, slot: int, page) -> None:
        if self.capacity == 0:
            return
        self._pages[slot] = page
        self._pages.move_to_end(slot)
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)

    def drop(self, slot: int) -> None:
        self._pages.pop(slot, None)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._pages.values())

    def __len__(self) -> int:
        return len(self._pages)
