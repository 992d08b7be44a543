"""A circuit breaker: after a failure, stop calling a backend for a while, then try once."""

from __future__ import annotations

import time
from collections.abc import Callable

BACKOFF_FIRST, BACKOFF_LONGEST = 0.25, 2.0  # seconds without calls once the circuit opens


class Circuit:
    """Closed: calls go through. Open: none until the back-off ends, then one trial call.

    A failed trial doubles the back-off (up to BACKOFF_LONGEST); any success closes it.
    Real time (monotonic), not the store's clock: it measures Redis, not the rules.
    """

    def __init__(self, timer: Callable[[], float] = time.monotonic) -> None:
        self._timer = timer
        self._backoff = 0.0
        self._retry_at = 0.0
        self._trial = False
        self.open = False

    def allow(self) -> bool:
        """May a call go now? While open, True means this call is the one trial."""
        if not self.open:
            return True
        if self._trial or self._timer() < self._retry_at:
            return False
        self._trial = True
        return True

    def retry_in(self) -> float:
        return max(0.0, self._retry_at - self._timer())

    def succeeded(self) -> bool:
        """Close; True if it was open."""
        was_open, self.open, self._trial, self._backoff = self.open, False, False, 0.0
        return was_open

    def failed(self, trial: bool) -> bool:
        """Open, or after a failed trial open for longer; True if it was closed.

        Calls already in flight when it opened fail too; they change nothing.
        """
        if self.open and not trial:
            return False
        was_open = self.open
        self._backoff = min(self._backoff * 2, BACKOFF_LONGEST) if was_open else BACKOFF_FIRST
        self._retry_at = self._timer() + self._backoff
        self.open, self._trial = True, False
        return not was_open

    def abandoned(self, trial: bool) -> None:
        """The call was cancelled (a client hung up): let the next call be the trial."""
        if trial:
            self._trial = False
