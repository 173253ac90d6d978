"""Flow control for one connection: its unsent output, bounded in bytes by backpressure.

The server never builds up an unbounded backlog for a client that does not read. An
:class:`Outbox` counts the bytes queued for a connection until the WebSocket library has
handed them to the socket; above the high-water mark it has no *room*, and the server then

- stops reading that connection's requests (they wait in the kernel's buffers, not in Python),
- holds its event streams (the events wait in the subscription's bounded queue, where a
  subscriber that falls too far behind is detected as lagged), and
- builds no further large answer for it,

until the client has read the output down to half the mark. Frames are JSON text with
``ensure_ascii``, so a frame's length is its size in bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Outbox"]


class Outbox:
    """The frames queued for one connection, in order, and how many bytes of them are unsent.

    Args:
        high_water: above this many unsent bytes there is no room; room comes back at half of it.
    """

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self.low_water = high_water // 2
        self.unsent = 0
        """Bytes queued and not yet taken by the socket (including the frame being sent)."""
        self._frames: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def has_room(self) -> bool:
        return self._room.is_set()

    def put(self, frame: bytes) -> None:
        """Queue ``frame``; never blocks (callers wait for :meth:`room` first where they can)."""
        self._frames.append(frame)
        self.unsent += len(frame)
        self._readable.set()
        self._empty.clear()
        if self.unsent > self.high_water:
            self._room.clear()

    async def get(self) -> bytes:
        """The next frame to send; call :meth:`sent` with it once the socket has it."""
        while not self._frames:
            self._readable.clear()
            await self._readable.wait()
        return self._frames.popleft()

    def sent(self, frame: bytes) -> None:
        self.unsent -= len(frame)
        if self.unsent <= self.low_water:
            self._room.set()
        if self.unsent == 0:
            self._empty.set()

    async def room(self) -> None:
        """Until the unsent output is below the high-water mark (at once when it is)."""
        await self._room.wait()

    async def drained(self) -> None:
        """Until everything queued has been taken by the socket."""
        await self._empty.wait()
