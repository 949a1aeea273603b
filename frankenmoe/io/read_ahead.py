"""Read-ahead of a writer's sources: the kernel reads the bytes the writer copies next while it copies these."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from frankenmoe.io.safetensors import TensorLocation, advise_will_need
from frankenmoe.io.written import WriteLog

READ_AHEAD_BYTES = 512 * 1024 * 1024
"""How far ahead of the writer `ReadAhead` asks for source bytes."""


class ReadAhead:
    """Keeps the kernel reading the source bytes a writer will copy next, about `window` bytes ahead of it.

    `pieces` are (output offset, source tensor): where among the tensor bytes the writer writes each
    source tensor's bytes go; the writer's position is what it publishes in `written`. A thread advises
    each piece (`advise_will_need`) once the writer is less than `window` bytes before it, so from a cold
    page cache the next tensors, often in other files, are being read while the current one is copied;
    the window bounds what the hints can add to the page cache. The thread sleeps until the writer
    moves on and ends with the log (`WriteLog.close` or `fail`).
    """

    def __init__(
        self, pieces: Sequence[tuple[int, TensorLocation]], written: WriteLog, window: int = READ_AHEAD_BYTES
    ) -> None:
        self._pieces = sorted(pieces, key=lambda piece: piece[0])
        self._written = written
        self._window = window
        self._thread = threading.Thread(target=self._run, name="frankenmoe-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        position: int | None = 0
        while position is not None and index < len(self._pieces):
            start = index
            while index < len(self._pieces) and self._pieces[index][0] < position + self._window:
                index += 1
            advise_will_need(location for _, location in self._pieces[start:index])
            position = self._written.wait_past(position)

    def join(self) -> None:
        """Wait for the thread, which ends once every piece is advised or the writer's log has ended."""
        self._thread.join()
