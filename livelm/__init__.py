"""livelm: a streaming-native LLM inference and serving engine."""

from livelm.outputs import CompletionOutput, Logprob, RequestOutput
from livelm.sampling_params import SamplingParams
from livelm.structured_output import StructuredOutput

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Engines import torch; keep `import livelm` light for tools that only need the types.
    if name == "LLM":
        from livelm.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from livelm.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
