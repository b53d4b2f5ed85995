"""SIGHUP's rolling restart: engines are restarted one at a time, each after the one
before it is back (STARTING or RUNNING again), so a host never stops all its GPUs at once."""
from __future__ import annotations

import collections
from typing import Iterable

from .slot import Slot, SlotState

_SERVING = (SlotState.STARTING, SlotState.RUNNING)
_ON_ITS_WAY = (SlotState.DRAINING, SlotState.STOPPING, SlotState.KILLING, SlotState.STARTING)


class RollingRestart:
    def __init__(self) -> None:
        self._queue: collections.deque[Slot] = collections.deque()
        self._current: Slot | None = None

    def begin(self, slots: Iterable[Slot]) -> int:
        self._queue = collections.deque(s for s in slots if s.state in _SERVING)
        self._current = None
        return len(self._queue)

    def cancel(self) -> None:
        self._queue.clear()
        self._current = None

    def next_slot(self) -> Slot | None:
        """The slot to drain now, or None while the current one is still on its way back."""
        current = self._current
        if current is not None and current.state in _ON_ITS_WAY:
            return None
        while self._queue:
            slot = self._queue.popleft()
            if slot.state in _SERVING:
                self._current = slot
                return slot
        self._current = None
        return None
