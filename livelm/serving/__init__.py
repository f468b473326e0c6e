"""Serving many engines as one: data-parallel replicas behind one server (docs/distributed.md).

One file per concept: the message protocol (``messages.py``), the replica process
(``replica_process.py``), the server's client of one replica (``replica_client.py``), the
router (``router.py``), the supervisor that restarts replicas (``supervisor.py``), the
AsyncEngine look-alike over all of them (``dp_engine.py``) and their Prometheus metrics
(``metrics.py``).
"""

from __future__ import annotations

from typing import Any


def make_async_engine(model: str | None = None, served_model_name: str | None = None, *,
                      router: str = "cache_aware", **kwargs: Any) -> Any:
    """An AsyncEngine, or a DataParallelEngine when ``data_parallel_size`` > 1."""
    if kwargs.get("data_parallel_size", 1) > 1:
        from livelm.serving.dp_engine import DataParallelEngine

        return DataParallelEngine(model, served_model_name, router=router, **kwargs)
    from livelm.engine.async_engine import AsyncEngine

    return AsyncEngine(model, served_model_name, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "DataParallelEngine":  # lazily: importing the package starts nothing
        from livelm.serving.dp_engine import DataParallelEngine

        return DataParallelEngine
    raise AttributeError(name)
