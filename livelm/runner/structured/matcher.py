"""One sequence's matcher, kept in step with the sequence's output tokens.

The runner never feeds a matcher the token it just sampled. Instead, before each step
that samples the sequence, ``sync`` makes the matcher's consumed tokens equal to the
sequence's output tokens as the scheduler holds them: it consumes the tokens it has not
seen and rolls back the ones that are gone. So whatever happens between two steps, a
recomputed (preempted) sequence, a step run again chunk by chunk after a failure
(``ModelRunner.execute_each``), a sampled token that was thrown away, or tokens dropped by
a later speculative decoder, the mask always follows the tokens that count.
"""

from __future__ import annotations

from livelm.core.token_ids import common_prefix_len
from livelm.runner.structured.backend import CompiledGrammar


class ConstraintViolation(RuntimeError):
    """The sequence's tokens left its grammar (or the grammar failed on them)."""


class SequenceMatcher:
    """A matcher for one sequence and the output tokens it has consumed."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.compiled = compiled
        self.matcher = compiled.new_matcher()
        self.consumed: list[int] = []

    def sync(self, output_token_ids: list[int]) -> None:
        """Make the consumed tokens equal ``output_token_ids`` (ConstraintViolation when the
        grammar refuses them)."""
        seen = self.consumed
        k = len(seen)
        common = common_prefix_len(seen, output_token_ids)  # usually k: the tokens only grew
        if common < k:
            if not self.matcher.rollback(k - common):
                self.matcher = self.compiled.new_matcher()  # cannot go back that far: replay
                common = 0
            del seen[common:]
        new = output_token_ids[common:]
        if new:
            if not self.matcher.consume_tokens(new):
                raise ConstraintViolation(
                    f"the output does not match its constraint any more: {self.matcher.get_error()}"
                )
            seen.extend(new)
        if self.matcher.is_error():
            raise ConstraintViolation(f"the output constraint failed: {self.matcher.get_error()}")
