"""The tool-call parsers (Hermes, Llama 3 JSON, Mistral) and the reader of forced calls,
on sample texts: each format, several calls, text around them, malformed JSON; and a text
split at every position (two cuts) gives the same content and calls as the whole text."""

from __future__ import annotations

import json

import pytest

from livelm.entrypoints.openai.tool_parsers import (
    TOOL_PARSER_CHOICES,
    TOOL_PARSERS,
    CallArguments,
    CallStart,
    ContentText,
    detect_tool_parser,
    parse_all,
    resolve_tool_parser,
)
from livelm.entrypoints.openai.tool_parsers.enforced import ArgumentsReader, CallArrayReader

HERMES, LLAMA, MISTRAL = TOOL_PARSERS["hermes"], TOOL_PARSERS["llama3_json"], TOOL_PARSERS["mistral"]


def fold(events) -> tuple[str, list[tuple[str, str]]]:  # noqa: ANN001
    content, calls = [], []
    for event in events:
        if isinstance(event, ContentText):
            content.append(event.text)
        elif isinstance(event, CallStart):
            assert event.index == len(calls)
            calls.append([event.name, event.arguments])
        else:
            assert isinstance(event, CallArguments)
            calls[event.index][1] += event.arguments
    return "".join(content), [(n, a) for n, a in calls]


def every_split(make, text: str):  # noqa: ANN001, ANN201
    """The folded events of ``text`` fed whole, after checking every two-cut split gives
    the same (the content and calls a stream sends equal the whole reply's)."""
    whole = make()
    expected = fold(whole.feed(text) + whole.finish())
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            reader = make()
            events = reader.feed(text[:i]) + reader.feed(text[i:j]) + reader.feed(text[j:])
            assert fold(events + reader.finish()) == expected, (i, j)
    one_by_one = make()
    events = [e for ch in text for e in one_by_one.feed(ch)]
    assert fold(events + one_by_one.finish()) == expected
    return expected


CASES = [
    # (parser, text, content, calls)
    (HERMES, 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Sure.", [("get_weather", '{"city": "Paris"}')]),
    (HERMES, '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
     '"arguments": {"x": [1, {"y": "}"}]}}</tool_call> done', "\n done",
     [("a", "{}"), ("b", '{"x": [1, {"y": "}"}]}')]),
    (HERMES, 'x <tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call>', "x ",
     [("a", '{"k": 1}')]),  # arguments written as a JSON string
    (HERMES, 'a <tool_call>{not json}</tool_call> b', "a <tool_call>{not json}</tool_call> b", []),
    (HERMES, 'a <tool_call>{"arguments": {}}</tool_call>', 'a <tool_call>{"arguments": {}}</tool_call>', []),
    (HERMES, '<tool_call>{"name": "cut", "arguments": {}}', "", [("cut", "{}")]),  # no closing tag
    (HERMES, '<tool_call>{"name": "cut", "argu', '<tool_call>{"name": "cut", "argu', []),
    (HERMES, "no calls, just <tool text <tool_cal", "no calls, just <tool text <tool_cal", []),
    (LLAMA, '{"name": "get_weather", "parameters": {"city": "Rome"}}', "",
     [("get_weather", '{"city": "Rome"}')]),
    (LLAMA, '<|python_tag|>{"name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": {}}',
     "", [("a", '{"n": 1}'), ("b", "{}")]),
    (LLAMA, 'Let me check. <|python_tag|>{"name": "a", "parameters": {}}', "Let me check. ",
     [("a", "{}")]),
    (LLAMA, '{"name": "a", "parameters": {"n": 1}', '{"name": "a", "parameters": {"n": 1}', []),
    (LLAMA, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA, "Plain text { with a brace", "Plain text { with a brace", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "a", "arguments": {"q": "x"}}, {"name": "b", "arguments": {}}]</s>',
     "", [("a", '{"q": "x"}'), ("b", "{}")]),
    (MISTRAL, 'Hello [TOOL_CALLS] [{"name": "a", "arguments": {}}] bye</s>', "Hello  bye",
     [("a", "{}")]),
    (MISTRAL, '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"nope": 1}]',
     '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"nope": 1}]', []),
    (MISTRAL, '[TOOL_CALLS][{"name": "a", "argum', '[TOOL_CALLS][{"name": "a", "argum', []),
    (MISTRAL, "just text [TOOL", "just text [TOOL", []),
    (MISTRAL, 'Sure[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{}</s>',
     "Sure", [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": ', '[TOOL_CALLS]get_weather[ARGS]{"city": ', []),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES,
                         ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_parser_reads_the_calls_and_every_split_agrees(parser, text, content, calls):
    assert every_split(parser, text) == (content, calls)
    assert parse_all(parser(), text) == (content, calls)
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


ARRAYS = [
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', True,
     [("get_weather", '{"city": "Paris"}')]),
    ('[ {"name": "a", "arguments": {"s": "a\\"}]b", "n": [1, {"x": 2}]}} ,\n {"arguments": {}, '
     '"name": "b"} ]', True, [("a", '{"s": "a\\"}]b", "n": [1, {"x": 2}]}'), ("b", "{}")]),
    ('[{"name": "a", "arguments": {"x": "unfinish', False, [("a", '{"x": "unfinish')]),
    ('[{"name": "a"', False, [("a", "")]),
    ("[", False, []),
]


@pytest.mark.parametrize(("text", "complete", "calls"), ARRAYS, ids=[str(i) for i in range(len(ARRAYS))])
def test_forced_call_array_streams_arguments_verbatim(text, complete, calls):
    """tool_choice="required": a call starts once its name is whole; its arguments arrive
    as written, in fragments that join to exactly the model's text."""
    assert every_split(CallArrayReader, text) == ("", calls)
    reader = CallArrayReader()
    reader.feed(text)
    reader.finish()
    assert reader.complete is complete


def test_forced_call_array_starts_a_call_at_its_name():
    reader = CallArrayReader()
    assert reader.feed('[{"name": "get_wea') == []
    first = reader.feed('ther", "arguments": {"ci')
    assert first == [CallStart(0, "get_weather", '{"ci')]
    assert reader.feed('ty": "Paris"}}') == [CallArguments(0, 'ty": "Paris"}')]
    assert not reader.complete
    assert reader.feed("]") == [] and reader.complete


def test_named_function_arguments_stream_from_the_first_character():
    assert every_split(lambda: ArgumentsReader("f"), '  {"a": [1, "}"]}') == ("", [("f", '{"a": [1, "}"]}')])
    reader = ArgumentsReader("f")
    assert reader.feed("  ") == []
    assert reader.feed(' {"a"') == [CallStart(0, "f", '{"a"')]
    assert not reader.complete
    assert reader.feed(": 1}") == [CallArguments(0, ": 1}")] and reader.complete


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ '[TOOL_CALLS]' }}{% for m in messages %}{% endfor %}", "mistral"),
    ("{% if tools %}<tool_call>{% endif %}", "hermes"),
    ("{{ '<|python_tag|>' }}", "llama3_json"),
    ("{% if message.role == 'ipython' %}{{ '<|eot_id|>' }}{% endif %}", "llama3_json"),
    ("{{ messages }}", "hermes"),  # no markers: the fallback prompt's format
    (None, "hermes"),
])
def test_parser_is_chosen_from_the_chat_template(template, expected):
    assert detect_tool_parser(template) == expected
    assert resolve_tool_parser("auto", template) is TOOL_PARSERS[expected]


def test_the_flag_chooses_a_parser_by_hand():
    assert set(TOOL_PARSER_CHOICES) == {"auto", "none", *TOOL_PARSERS}
    assert resolve_tool_parser("mistral", "<tool_call>") is MISTRAL
    assert resolve_tool_parser("none", "<tool_call>") is None
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        resolve_tool_parser("qwen", None)
