"""What a constrained request's output must be: a JSON schema, any JSON object, a regular
expression, one of a list of strings, or a context-free grammar.

This is plain data, checked for shape and size when built; whether a schema, regex or
grammar actually compiles is checked by the engine when the request is added (a
``ValueError`` there, a 400 from the server), before any compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from livelm.sampling_params import is_valid_unicode

# Bounds on one constraint (docs/serving.md#request-limits): a schema, regex or grammar is
# compiled per distinct text, so its size bounds the work one request can cause.
MAX_SPEC_CHARS = 100_000
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _schema_text(schema: Any) -> str:
    """Compact JSON text of a schema given as a dict, a JSON string or a pydantic model
    class (the same schema always gives the same text, so compiled grammars can be cached
    by it). Keys keep their order: the output's properties come in the schema's order
    (a "reasoning" field before an "answer" field is written first), so two schemas that
    differ only in order are different constraints."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError("the JSON schema is nested too deeply") from None
    if isinstance(schema, bool):  # JSON Schema allows true / false
        return json.dumps(schema)
    if not isinstance(schema, dict):
        raise ValueError(
            "a JSON schema must be an object (a dict, a JSON string or a pydantic model class), "
            f"got {type(schema).__name__}"
        )

    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError("the JSON schema must not hold NaN or Infinity") from None
    except TypeError as e:
        raise ValueError(f"the JSON schema must hold only JSON values: {e}") from None
    except RecursionError:
        raise ValueError("the JSON schema is nested too deeply") from None


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on one request's output; set exactly one field.

    - ``json``: a JSON schema (dict, JSON text or pydantic model class); kept as compact
      JSON text, keys in their order (the order the output's properties are written in).
    - ``json_object=True``: any JSON object.
    - ``regex``: the whole output matches this regular expression.
    - ``choice``: the output is exactly one of these strings.
    - ``grammar``: a context-free grammar in Lark syntax (llguidance's dialect); one that
      defines its rules with ``::=`` is read as GBNF (llama.cpp's format) and converted.

    docs/structured_output.md says what each kind accepts and how outputs end.

    ``SamplingParams(structured=...)`` takes one of these, or a dict / pydantic model class
    as shorthand for ``StructuredOutput(json=...)``.
    """

    json: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be a boolean, got {self.json_object!r:.40}")
        given = [k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object)]
        if len(given) != 1:
            raise ValueError(
                f"a structured output constraint takes exactly one of {', '.join(KINDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str | bytes) or not hasattr(choice, "__iter__"):
                raise ValueError(f"choice must be a list of strings, got {choice!r:.100}")
            choice = tuple(choice)
            if not choice or len(choice) > MAX_CHOICES:
                raise ValueError(f"choice must hold 1 to {MAX_CHOICES} strings, got {len(choice)}")
            for c in choice:
                if not isinstance(c, str) or not c:
                    raise ValueError("choice must hold non-empty strings")
                if len(c) > MAX_CHOICE_CHARS:
                    raise ValueError(f"each choice must be at most {MAX_CHOICE_CHARS} characters, got one of {len(c)}")
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r:.60}")
        text = self.spec
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} constraint must be at most {MAX_SPEC_CHARS} characters, got {len(text)}")
        if not is_valid_unicode(text):
            raise ValueError(f"the {self.kind} constraint must be valid Unicode text (no lone surrogates)")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of ``KINDS``."""
        if self.json_object:
            return "json_object"
        return next(k for k in KINDS if k != "json_object" and getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        """The constraint as text (schema JSON, regex, grammar, the choices as a JSON list;
        empty for ``json_object``): with ``kind``, the key compiled grammars are cached by."""
        if self.json_object:
            return ""
        if self.choice is not None:
            return json.dumps(list(self.choice), ensure_ascii=False)
        return getattr(self, self.kind)

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutput | None:
        """``None``, a StructuredOutput, or a JSON schema shorthand (dict or pydantic model
        class) as a StructuredOutput."""
        if value is None or isinstance(value, StructuredOutput):
            return value
        if isinstance(value, dict) or (isinstance(value, type) and hasattr(value, "model_json_schema")):
            return cls(json=value)
        raise ValueError(
            "structured must be a StructuredOutput, a JSON schema dict or a pydantic model class, "
            f"got {type(value).__name__}"
        )
