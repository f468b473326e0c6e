"""Prompt text of a requested token length, for any tokenizer.

Random token ids decode to byte soup that re-tokenizes to a different length; random
common words do not, and read like text to a server's detokenizer and prefix cache.
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two "
    "like him see time could no make than first been its who now people my made over did "
    "down only way find use may water long little very after words called just where most "
    "know get through back much before go good new write our used me man too any day same "
    "right look think also around another came come work three word must because does part "
    "even place well such here take why things help put years different away again off "
    "went old number great tell men say small every found still between name should home "
    "big give air line set own under read last never us left end along while might next "
    "sound below saw something thought both few those always looked show large often "
    "together asked house world going want school important until form food keep children "
    "feet land side without boy once animals life enough took sometimes four head above "
    "kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story "
    "boys since white days ever paper hard near sentence better best across during today "
    "others however sure means knew try told young miles sun ways thing whole hear example "
    "heard several change answer room sea against top turned learn point city play toward "
    "five using himself usually river market garden window music morning system engine"
).split()


class PromptMaker:
    """Makes prompts of (nearly) exact token lengths from random common words.

    ``ids(n)`` is exact: n token ids (what offline runs feed the engine). ``text(n)`` is
    their decoded text, which a server re-tokenizes to n tokens give or take one at the
    very end (a word cut in half may merge differently); servers report the real count.
    """

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        sample = " ".join(_WORDS[:200])
        n = len(self._encode(sample))
        self._tokens_per_word = max(n / 200, 0.25)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def ids(self, num_tokens: int) -> list[int]:
        """Exactly ``num_tokens`` token ids of random words."""
        if num_tokens <= 0:
            return []
        words = int(num_tokens / self._tokens_per_word * 1.1) + 4
        while True:
            text = " ".join(self.rng.choice(_WORDS) for _ in range(words))
            ids = self._encode(text)
            if len(ids) >= num_tokens:
                return ids[:num_tokens]
            words *= 2

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (no special tokens are ever produced here)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, num_tokens: int) -> tuple[str, list[int]]:
        """Text of about ``num_tokens`` tokens, and the exact ids it came from."""
        ids = self.ids(num_tokens)
        return self.decode(ids), ids

    def count(self, text: str) -> int:
        """Tokens in ``text`` (no special tokens added)."""
        return len(self._encode(text))
