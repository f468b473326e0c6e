"""llguidance for one engine: its view of the tokenizer and the model's vocabulary, and
the compiled grammars of the constraints it has seen.

Built once per engine; the expensive parts are made on first use (llguidance reads the
whole vocabulary, about a second for a large one), so an engine that never sees a
constraint never pays. ``compile`` is thread-safe: the server calls it off its event loop
(``AsyncEngine.check_structured``) while the engine thread steps.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import llguidance

from livelm.runner.structured.grammars import WHAT, grammar_text
from livelm.structured_output import StructuredOutput

# Distinct constraints kept compiled (a compiled schema is a few hundred KB at most);
# refusals are kept too, so a bad schema sent again is refused without compiling.
CACHE_SIZE = 256
# llguidance's messages can quote a whole grammar; a 400 needs the start of it.
MAX_ERROR_CHARS = 2000


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + " ..."


@dataclass(frozen=True)
class CompiledGrammar:
    """A constraint compiled once: a matcher at its start, which every sequence under this
    constraint copies (``new_matcher``), and how long compiling took."""

    kind: str
    spec: str
    grammar: str = field(repr=False)
    prototype: llguidance.LLMatcher = field(repr=False)
    compile_s: float = 0.0

    def new_matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar."""
        return self.prototype.deep_copy()


class GrammarBackend:
    """Compiles constraints for one engine's tokenizer and vocabulary.

    ``vocab_size`` is the model's: it may be larger than the tokenizer's (padded rows of
    the embedding), and those ids are never allowed. ``eos_token_ids`` are the engine's:
    wherever the grammar may end, every one of them is allowed.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int], cache_size: int = CACHE_SIZE) -> None:
        self._hf_tokenizer = tokenizer
        self.model_vocab_size = vocab_size
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | ValueError] = OrderedDict()
        self.num_compiled = 0  # cache misses that compiled (for tests and stats)

    # ---------------------------------------------------------------- tokenizer

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer (built on first use, once)."""
        if self._ll_tokenizer is None:
            with self._init_lock:
                if self._ll_tokenizer is None:
                    self._ll_tokenizer = self._build_tokenizer()
        return self._ll_tokenizer

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        tok = self._hf_tokenizer
        # The bitmask covers the model's rows and the tokenizer's ids, whichever is more.
        n_vocab = max(self.model_vocab_size, len(tok))
        eos = tok.eos_token_id
        if self.eos_token_ids and eos not in self.eos_token_ids:
            eos = self.eos_token_ids[0]
        backend = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer of a fast one
        if backend is None:
            raise ValueError("structured output needs a fast (Rust) Hugging Face tokenizer; this model's is not")
        try:
            # What llguidance.hf.from_tokenizer does, without its check of the wrapper class
            # (which transformers renames between versions): the Rust tokenizer's JSON, with
            # padding and truncation off, holds every added token.
            backend = copy.copy(backend)
            backend.no_padding()
            backend.no_truncation()
            return llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos)
        except Exception as e:  # noqa: BLE001 - a tokenizer llguidance cannot read
            raise ValueError(f"structured output is not available for this model's tokenizer: {e}") from e

    @property
    def eos_token_id(self) -> int:
        """The end token llguidance marks in its masks where the grammar may end."""
        return self.ll_tokenizer.eos_token

    @property
    def mask_vocab_size(self) -> int:
        """Tokens one bitmask row covers (32 per int32 word)."""
        return self.ll_tokenizer.vocab_size

    @property
    def mask_words(self) -> int:
        """int32 words of one bitmask row."""
        return (self.mask_vocab_size + 31) // 32

    # ------------------------------------------------------------------ compile

    def compile(self, structured: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar of ``structured`` (cached by kind and spec); ValueError
        with llguidance's message when the schema, regex or grammar is invalid."""
        key = (structured.kind, structured.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            # Compiled outside the lock: a long compile never holds up a cache hit. Two
            # threads compiling the same constraint at once both get a correct result.
            hit = self._compile(structured)
            with self._lock:
                self.num_compiled += 1
                self._cache[key] = hit
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, ValueError):
            raise ValueError(str(hit))
        return hit

    def _compile(self, structured: StructuredOutput) -> CompiledGrammar | ValueError:
        what = WHAT[structured.kind]
        t0 = time.perf_counter()
        try:
            grammar = grammar_text(structured)
        except ValueError as e:
            return ValueError(f"invalid {what}: {_short(str(e))}")
        tokenizer = self.ll_tokenizer
        # LLMatcher never raises for a bad grammar: it starts in an error state.
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            # The first mask builds the lexer's start: limits a grammar exceeds show here,
            # and every sequence's copy starts from a warm matcher.
            matcher.compute_bitmask()
        if matcher.is_error():
            return ValueError(f"invalid {what}: {_short(matcher.get_error())}")
        return CompiledGrammar(structured.kind, structured.spec, grammar, matcher, time.perf_counter() - t0)

    def cached(self, structured: StructuredOutput) -> bool:
        """True when ``structured`` is in the cache (compiled or refused)."""
        with self._lock:
            return (structured.kind, structured.spec) in self._cache
