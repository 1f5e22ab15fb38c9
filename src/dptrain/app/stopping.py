"""How a run reports progress (the ``RunDisplay`` protocol) and stops: Ctrl-C and SIGTERM end training after the
current step (``StopRequest``, ``stop_on_signals``); the run's final status."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any, Protocol

COMPLETED, INTERRUPTED, BUDGET_EXHAUSTED = "completed", "interrupted", "budget_exhausted"


class RunDisplay(Protocol):
    """What a run reports while it trains (``dptrain.report.console.RichDisplay`` renders it)."""

    def start(self, name: str, total_steps: int, info: dict[str, Any]) -> None: ...

    def advance(self, steps_done: int) -> None: ...

    def epoch(self, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


class _NoDisplay:
    def start(self, name: str, total_steps: int, info: dict[str, Any]) -> None:
        pass

    def advance(self, steps_done: int) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


class StopRequest:
    """Set by a signal handler (or by the caller, from any thread) to end training after the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signal_number: int | None = None

    def set(self, reason: str = INTERRUPTED, signal_number: int | None = None) -> None:
        if not self._event.is_set():
            self.reason, self.signal_number = reason, signal_number
            self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, enabled: bool = True) -> Iterator[None]:
    """While active, SIGINT (Ctrl-C) and SIGTERM set ``stop``; a second signal raises KeyboardInterrupt (abort).

    Only on the main thread (Python delivers signals there); nests: the previous handlers come back on exit.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        if stop:
            raise KeyboardInterrupt
        stop.set(INTERRUPTED, signum)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
