"""Default fixtures of the server tests: one tiny-model engine and a server on it per
module. A module that needs other engine or server settings defines its own ``engine``
or ``server`` fixture, which overrides these."""

from __future__ import annotations

import pytest
from server_utils import serve, start_engine, stop_engine


@pytest.fixture(scope="module")
def engine(llama_dir):
    """The tiny Llama behind an AsyncEngine: 1024-token context, a 0.25 GiB KV cache."""
    engine = start_engine(llama_dir, max_model_len=1024, kv_cache_gib=0.25)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    """A real uvicorn server with ``livelm serve``'s default limits on ``engine``."""
    with serve(engine) as srv:
        yield srv
