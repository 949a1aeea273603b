"""What a writer has written so far, published as it writes: the hand-off to the readers that run behind it.

The writer (ShardWriter, given the log) publishes each tensor once all of its bytes are in its file
(name, file, offsets: a TensorLocation) and counts the tensor bytes it writes; it ends the log with
`close` when it is done or `fail` when it stops early. Readers block until what they need is published
(`wait_for` a tensor, `wait_past` a byte count), woken by the writer, and are never left waiting once
the log has ended. The merge's routing check reads tensors this way, and ReadAhead follows the count.
"""

from __future__ import annotations

import threading

from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TensorLocation


class WriteLog:
    """The tensors a writer has finished and the tensor bytes it has written, for readers on other threads.

    >>> log = WriteLog(); log.advance(4); log.wait_past(0)
    4
    >>> log.close(); log.wait_past(4) is None
    True
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._tensors: dict[str, TensorLocation] = {}
        self._position = 0
        self._ended = False
        self._failure: str | None = None

    def advance(self, count: int) -> None:
        """`count` more tensor bytes are written (in the order the writer writes its files' tensors)."""
        with self._changed:
            self._position += count
            self._changed.notify_all()

    def publish(self, location: TensorLocation) -> None:
        """All of this tensor's bytes are in `location.file`: readers may read it from now on."""
        with self._changed:
            self._tensors[location.name] = location
            self._changed.notify_all()

    def close(self) -> None:
        """The writer is done: a tensor not published by now never will be. Harmless after `fail`."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def fail(self, reason: str) -> None:
        """The writer stopped early (`reason`, for the readers' message): every waiting reader is released."""
        with self._changed:
            if not self._ended:
                self._failure = reason
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, name: str) -> TensorLocation:
        """Tensor `name` once all of its bytes are written; ModelError if the writer ended without writing it."""
        with self._changed:
            self._changed.wait_for(lambda: name in self._tensors or self._ended)
            location = self._tensors.get(name)
            failure = self._failure
        if location is not None:
            return location
        if failure is not None:
            raise ModelError(f"Tensor {name!r} was never written: the writer stopped ({failure}).")
        raise ModelError(f"Tensor {name!r} was never written: the writer finished without it.")

    def wait_past(self, position: int) -> int | None:
        """Block until more than `position` tensor bytes are written; their count, or None once the writer has
        ended (nothing more will come)."""
        with self._changed:
            self._changed.wait_for(lambda: self._position > position or self._ended)
            return None if self._position <= position else self._position
