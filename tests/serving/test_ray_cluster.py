"""Data-parallel replicas on a simulated two-node Ray cluster (ray.cluster_utils), in its
own module: the DP module's engines (one of them on a Ray cluster of its own) are shut
down before this one connects to a cluster it did not start."""

from __future__ import annotations

import asyncio

import pytest
from server_utils import greedy_text, start_engine, stop_engine

from livelm.sampling_params import SamplingParams
from livelm.serving.dp_engine import DataParallelEngine

ENGINE_KW = {"max_model_len": 512, "kv_cache_gib": 0.05}
GREEDY = {"temperature": 0.0}
PROMPTS = [f"Request number {i} asks about {'cats' if i % 2 else 'the weather'} today" for i in range(4)]


@pytest.fixture(scope="module")
def single(llama_dir):
    """One engine with the same options: the reference."""
    engine = start_engine(llama_dir, **ENGINE_KW)
    yield engine
    stop_engine(engine)




def test_ray_two_node_cluster_one_replica_per_node(llama_dir, single):
    """A simulated two-node Ray cluster on this machine (ray.cluster_utils): with
    STRICT_SPREAD each replica lands on its own node, the server reaches them at the
    node address Ray reports (not loopback), both answer greedy-exactly, and shutting the
    engine down leaves the cluster (which it did not start) running, without its actors."""
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray (the test extra installs it)")
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "an earlier test left Ray running in this process"

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        engine = DataParallelEngine(str(llama_dir), data_parallel_size=2, num_threads=2, backend="ray",
                                    ray_placement_strategy="STRICT_SPREAD", **ENGINE_KW)
        try:
            assert not engine._ray.local_cluster and engine._ray.server_host != "127.0.0.1"
            table = ray.util.placement_group_table(engine._ray.group)
            assert len(set(table["bundles_to_node_id"].values())) == 2, table  # one bundle per node
            params = SamplingParams(max_tokens=6, **GREEDY)

            async def run() -> list[str]:
                async def one(p: str) -> str:
                    text = ""
                    async for out in engine.generate(p, params):
                        text += out.outputs[0].text
                    return text
                return await asyncio.gather(*(one(p) for p in PROMPTS[:4]))

            got = asyncio.run(run())
            assert got == [greedy_text(single, p, 6) for p in PROMPTS[:4]]
            assert all(engine.replica(i).stats is not None for i in range(2))
        finally:
            asyncio.run(engine.shutdown())
        assert ray.is_initialized()  # not ours to stop
        assert not any(engine.replica(i).process.is_alive() for i in range(2))
    finally:
        ray.shutdown()
        cluster.shutdown()
