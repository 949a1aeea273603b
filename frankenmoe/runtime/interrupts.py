"""Ctrl-C and SIGTERM: exceptions until a merge commits its checkpoint, held while cleanup and the swap run."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class SigtermInterrupt(KeyboardInterrupt):
    """SIGTERM (`timeout`, `docker stop`, a CI cancel) raised in the main thread, so it unwinds like Ctrl-C."""


@dataclass
class _Interrupts:
    """Where Ctrl-C and SIGTERM stand: process-wide like the signals, and only the main thread changes it."""

    in_scope: bool = False
    """A command's interrupt_scope installed the handler, and settles held signals when it ends."""
    holds: int = 0
    """Open interrupts_held blocks: signals are recorded, not raised."""
    committed: bool = False
    """The new checkpoint is in place: every later signal is recorded until the scope ends."""
    held: list[int] = field(default_factory=list)


_interrupts = _Interrupts()


def _on_interrupt(signum: int, _frame: object) -> None:
    if _interrupts.holds or _interrupts.committed:
        _interrupts.held.append(signum)
    elif signum == signal.SIGTERM:
        raise SigtermInterrupt
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_scope() -> Iterator[Callable[[], list[int]]]:
    """One command's Ctrl-C and SIGTERM: exceptions until a merge commits its checkpoint, held after that.

    Yields a function that lists the signals which arrived after the commit: they stopped nothing,
    and the command has succeeded. A signal the parent process ignores stays ignored.
    """
    if threading.current_thread() is not threading.main_thread() or _interrupts.in_scope:
        yield _signals_after_commit  # off the main thread nothing is held; an enclosing scope settles its own
        return
    previous = _install_handler()
    _interrupts.in_scope = True
    try:
        yield _signals_after_commit
    finally:
        _interrupts.in_scope = _interrupts.committed = False
        _interrupts.held.clear()
        _restore_handlers(previous)


def _signals_after_commit() -> list[int]:
    return list(_interrupts.held) if _interrupts.committed else []


def take_held_signals() -> list[int]:
    """The signals held in this command's scope so far, which then starts afresh for the next merge.

    `build` calls it after each config: a signal held during one merge's swap (or its failing cleanup)
    must stop the batch rather than wait for the end of the command, and the next merge must raise on
    a signal again instead of holding it as if it had already committed.
    """
    taken = list(_interrupts.held)
    _interrupts.held.clear()
    _interrupts.committed = False
    return taken


def mark_committed() -> None:
    """The new checkpoint is in place: from now on the scope's signals are held, for the merge has succeeded."""
    if _interrupts.in_scope and threading.current_thread() is threading.main_thread():
        _interrupts.committed = True


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for a moment: cleanup and the swap must not be abandoned half-way.

    Inside an interrupt_scope the scope settles them: they are reported after a commit, and a failing
    merge fails anyway; a batch takes them between two merges (`take_held_signals`) and stops. Outside
    one (library use) they are delivered when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = None if _interrupts.in_scope or _interrupts.holds else _install_handler()
    _interrupts.holds += 1
    try:
        yield
    finally:
        _interrupts.holds -= 1
        if installed is not None:
            _restore_handlers(installed)
            pending = list(_interrupts.held)
            _interrupts.held.clear()
            for signum in pending:
                signal.raise_signal(signum)


def _install_handler() -> dict[int, Any]:
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN:
            previous[signum] = handler
            signal.signal(signum, _on_interrupt)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        # None: a handler not set from Python, which only the default can stand for.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
