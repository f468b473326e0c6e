"""Errors the engine APIs raise to their callers (importable without loading the engine)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or its loop died): no request can be served.

    Requests in flight when it stopped get it, and so does every later request; the server
    answers it with a 503.
    """
