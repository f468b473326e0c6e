"""A StructuredOutput as llguidance grammar text, one rule per kind.

JSON (a schema or any object) is generated on one line, with exactly one space after
each ``,`` and ``:`` (``{"a": 1, "b": [true, null]}``, Python's ``json.dumps`` style, which
models have seen most) and no other whitespace: with free whitespace a model can emit
spaces or newlines between tokens forever and never close the object. These options are
llguidance *overrides*, so a schema's own ``x-guidance`` cannot turn free whitespace on.
"""

from __future__ import annotations

import llguidance

from livelm.structured_output import StructuredOutput

JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_JSON_OBJECT = '{"type": "object"}'
# What each kind is called in error messages.
WHAT = {
    "json": "JSON schema",
    "json_object": "JSON object constraint",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}


def grammar_text(structured: StructuredOutput) -> str:
    """llguidance grammar text for ``structured``; ValueError when it cannot be one (a
    schema llguidance refuses to read). Whether the text compiles is checked by building
    a matcher (``GrammarBackend.compile``)."""
    kind = structured.kind
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(structured.json, overrides=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, overrides=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(structured.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_regex(choice_regex(structured.choice))
    return llguidance.LLMatcher.grammar_from_lark(lark_text(structured.grammar))


def choice_regex(choices: tuple[str, ...]) -> str:
    """A regex matching exactly one of ``choices``: every character that is not an ASCII
    letter or digit is written as ``\\x{hex}``, so no choice can carry regex syntax."""
    return "|".join(
        "(?:" + "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in choice) + ")"
        for choice in choices
    )


def is_gbnf(grammar: str) -> bool:
    """GBNF (llama.cpp's format) defines rules with ``::=``; Lark uses ``:``."""
    return "::=" in grammar


def lark_text(grammar: str) -> str:
    """The grammar in llguidance's Lark dialect: GBNF is converted, Lark is kept."""
    if not is_gbnf(grammar):
        return grammar
    try:
        from llguidance.gbnf_to_lark import any_to_lark
    except ImportError:  # an llguidance without the converter
        raise ValueError("this grammar looks like GBNF, which this llguidance cannot convert: write it in Lark syntax") from None
    try:
        return any_to_lark(grammar)
    except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions for bad input
        raise ValueError(f"cannot convert this GBNF grammar to Lark: {e}") from None
