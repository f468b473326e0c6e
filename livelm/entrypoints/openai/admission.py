"""Back-pressure: a bounded count of sequences admitted but not finished."""

from __future__ import annotations

from livelm.entrypoints.openai.errors import OpenAIError


class AdmissionTicket:
    """Proof that some sequences were admitted; releasing it twice is harmless."""

    def __init__(self, control: AdmissionControl, num_seqs: int) -> None:
        self._control = control
        self.num_seqs = num_seqs
        self._released = False

    def release(self) -> None:
        """Give the sequences' places back (call when the response is done or dropped)."""
        if not self._released:
            self._released = True
            self._control._in_flight -= self.num_seqs


class AdmissionControl:
    """Admit at most ``max_running + max_waiting`` sequences at a time.

    The engine runs ``max_running`` sequences per step; anything admitted beyond that
    waits. The count is kept here, at admission, rather than read from the engine's own
    queue, because a burst of requests arrives faster than the engine thread picks them up:
    counting at the door is the only way the bound actually holds. All calls happen on the
    event loop thread, so a plain integer is enough.
    """

    def __init__(self, max_running: int, max_waiting: int | None, retry_after_s: int = 1) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Sequences admitted and not yet finished."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Admitted sequences beyond what the engine runs at once."""
        return max(0, self._in_flight - self.max_running)

    def admit(self, num_seqs: int) -> AdmissionTicket:
        """Admit ``num_seqs`` sequences or raise a 503 with ``Retry-After``.

        A request for more sequences than the whole bound (``max_running + max_waiting``)
        could never be admitted alongside anything else, so it is refused with a 400 that
        says so, idle server or not (``n`` itself is bounded by the engine's ``max_n`` and
        ``max_num_seqs``; this catches many prompts times ``n``).
        """
        if self.max_waiting is not None:
            bound = self.max_running + self.max_waiting
            if num_seqs > bound:
                raise OpenAIError(
                    f"the request asks for {num_seqs} sequences (prompts times n), more than the "
                    f"server ever admits at once ({bound}: {self.max_running} running and "
                    f"{self.max_waiting} waiting): split it into smaller requests",
                    400,
                    code="too_many_sequences",
                )
            if self._in_flight + num_seqs > bound:
                raise OpenAIError(
                    f"server is at capacity ({self._in_flight} sequences in flight, "
                    f"at most {self.max_running} running and {self.max_waiting} waiting); "
                    "retry later",
                    503,
                    "server_error",
                    code="queue_full",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
        self._in_flight += num_seqs
        return AdmissionTicket(self, num_seqs)
