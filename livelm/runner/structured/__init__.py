"""Constrained decoding (structured output) with llguidance.

- ``grammars``: a :class:`~livelm.structured_output.StructuredOutput` as llguidance
  grammar text, per kind (JSON schema, any JSON object, regex, choice, Lark / GBNF grammar).
- ``backend``: :class:`GrammarBackend`, one per engine: llguidance's view of the tokenizer
  and the model's vocabulary, and the compiled grammars (bounded LRU, thread-safe).
- ``matcher``: :class:`SequenceMatcher`, one sequence's matcher kept in step with its
  output tokens (consumes what is new, rolls back what was dropped).
- ``step``: :class:`StructuredDecoding`, the runner's per-sequence matchers and the token
  bitmask of one step, filled in a worker thread while the model runs.

The sampler applies the bitmask (``runner/sampling/token_mask.py``).
"""

from livelm.runner.structured.backend import CompiledGrammar, GrammarBackend
from livelm.runner.structured.step import StepMasks, StructuredDecoding

__all__ = ["CompiledGrammar", "GrammarBackend", "StepMasks", "StructuredDecoding"]
