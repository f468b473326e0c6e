"""Errors the engine APIs raise to their callers (importable without loading the engine)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or its loop died): no request can be served.

    Requests in flight when it stopped get it, and so does every later request; the server
    answers it with a 503 (its ``code`` is the OpenAI error body's).
    """

    code = "engine_stopped"


class ReplicaFailedError(EngineDeadError):
    """The data-parallel replica serving a request died (docs/distributed.md): the request
    ended without finishing; the other replicas still serve, so a retry is answered."""

    code = "replica_failed"


class SessionLostError(ReplicaFailedError):
    """A session's KV lived on a replica that died since its last turn: reported once, on
    the session's next use (a retry starts it afresh on another replica)."""

    code = "session_lost"
