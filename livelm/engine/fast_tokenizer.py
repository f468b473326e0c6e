"""A model's tokenizer without importing transformers: its ``tokenizer.json`` through the
``tokenizers`` library and its chat template through jinja2's sandbox.

Importing transformers costs ~0.7 s of every start-up on this machine class, a quarter of
a short ``livelm generate``. :class:`FastTokenizer` offers what the engine, the server
and the detokenizer use of a Hugging Face fast tokenizer (encode with offsets, decode,
token strings, special tokens, the chat template), computed the way transformers
computes them for ``PreTrainedTokenizerFast``.

It is used only where it has been shown to agree: the first load of a model directory
goes through transformers, :func:`first_difference` compares the two on probe texts and
conversations (encodings with and without special tokens, offsets, decodes, token
strings, special tokens, sizes, the template and its renderings), and only a directory
where nothing differed is remembered as safe (``engine/tokenizer_class_cache.py``). A
directory without ``tokenizer.json``, or with a template transformers renders
differently, keeps using transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# The named special tokens transformers exposes as attributes (and to chat templates).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Encoding(dict):
    """What ``tokenizer(text)`` returns: ``input_ids`` (and ``offset_mapping`` when asked),
    by key or attribute, like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as saved: {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class FastTokenizer:
    """A model directory's ``tokenizer.json``, special tokens and chat template."""

    def __init__(self, backend: Tokenizer, config: dict, special_map: dict, chat_template: str | dict | None,
                 name_or_path: str = "") -> None:
        self.backend_tokenizer = backend
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special_tokens_map: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name, special_map.get(name)))
            if text is not None:
                self.special_tokens_map[name] = text
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        if extra is None:
            extra = special_map.get("additional_special_tokens", [])
        extra_texts = extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else []
        self.extra_special_tokens = [t for t in map(_token_text, extra_texts) if t is not None]
        self._vocab_with_added = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> FastTokenizer:
        """Load ``model_dir``'s tokenizer; ValueError where it has no ``tokenizer.json``."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no tokenizer.json")
        config = _read_json(model_dir / "tokenizer_config.json")
        template: str | dict | None = None
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        else:
            raw = config.get("chat_template") or _read_json(model_dir / "chat_template.json").get("chat_template")
            if isinstance(raw, list):  # named templates: [{"name": ..., "template": ...}]
                raw = {t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t}
            template = raw if isinstance(raw, str | dict) else None
        return cls(Tokenizer.from_file(str(path)), config, _read_json(model_dir / "special_tokens_map.json"),
                   template, str(model_dir))

    # ----------------------------------------------------------------- special tokens

    def __getattr__(self, name: str) -> Any:
        # bos_token, eos_token_id, ...: like transformers, None when the model has none.
        base, is_id = (name[:-3], True) if name.endswith("_id") else (name, False)
        if base in SPECIAL_TOKEN_NAMES:
            text = self.__dict__.get("special_tokens_map", {}).get(base)
            if not is_id or text is None:
                return text
            return self.backend_tokenizer.token_to_id(text)
        raise AttributeError(name)

    @cached_property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then the extra ones, each once."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @cached_property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens` (those the vocabulary has)."""
        ids = (self.backend_tokenizer.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    @cached_property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """Added tokens by id (each with ``content`` and ``special``)."""
        return dict(self.backend_tokenizer.get_added_tokens_decoder())

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._vocab_with_added

    def get_vocab(self) -> dict[str, int]:
        """Every token string (added ones too) and its id."""
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    # ----------------------------------------------------------------- encode / decode

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> Encoding:
        """Token ids of ``text`` (and character offsets when asked)."""
        enc = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = Encoding(input_ids=enc.ids)
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return self(text, add_special_tokens=add_special_tokens).input_ids

    def decode(self, token_ids: list[int] | int, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of ``token_ids``."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | None | list:
        """Token strings of ids (None for an id the vocabulary lacks, as transformers gives)."""
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend_tokenizer.id_to_token(i) for i in ids if i not in skipped]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list:
        """Ids of token strings."""
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The text a run of token strings reads as (the decoder's, else joined by spaces)."""
        decoder = self.backend_tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # ----------------------------------------------------------------- chat template

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs: Any) -> str | list[int]:
        """Render ``conversation`` with the model's template (as transformers does: the
        sandboxed environment, its filters and globals, the special tokens as variables,
        message keys whose value is None dropped)."""
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        template = _compiled(self._template_source(tools))
        messages = [{k: v for k, v in m.items() if v is not None} for m in conversation]
        text = template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        return self(text, add_special_tokens=False).input_ids if tokenize else text

    def _template_source(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            if tools and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError("this tokenizer has named chat templates but no 'default' one")
        if not isinstance(template, str):
            raise ValueError("this model has no chat template")
        return template


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization: no space before punctuation and contractions.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


_TEMPLATES: dict[str, Any] = {}


def _compiled(source: str) -> Any:
    """The template compiled once per source, in an environment built like transformers'
    (immutable sandbox, trim_blocks + lstrip_blocks, loop controls, its ``tojson``,
    ``raise_exception`` and ``strftime_now``)."""
    template = _TEMPLATES.get(source)
    if template is None:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            # Not jinja's own tojson, which escapes HTML characters.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = _TEMPLATES[source] = env.from_string(source)
    return template


# ---------------------------------------------------------------------- agreement

PROBE_TEXTS = (
    "", " ", "Hello world", "Hello  world\n\n  tabs\tand spaces ", "   leading", "trailing   ",
    "What is the capital of France?", "é 日本語 🙂 ÿ Ω", "def f(x):\n    return x ** 2  # ok",
    "Hello , world . Isn 't it ? I 'm here !", "<|im_start|>user\nhi<|im_end|>", "<s> </s> <unk> [INST]",
    "<|begin_of_text|><|eot_id|><|endoftext|>", "1234567890 3.14159 -2e10", "\u00a0\u2028\u200b zero-width",
)
PROBE_CHATS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b> é"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again? 🙂"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": None},
     {"role": "user", "content": "  spaced  \n"}],
)
PROBE_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}},
                                                                 "required": ["city"]}}}]


def first_difference(fast: FastTokenizer, hf: Any) -> str | None:
    """What :class:`FastTokenizer` does differently from transformers' tokenizer ``hf`` on
    the probes, or None when nothing differs (then the fast one may stand in for it)."""
    checks: list[tuple[str, Any, Any]] = [
        ("len", len(fast), len(hf)),
        ("vocab_size", fast.vocab_size, hf.vocab_size),
        ("special_tokens_map", fast.special_tokens_map, dict(hf.special_tokens_map)),
        ("all_special_ids", sorted(set(fast.all_special_ids)), sorted(set(hf.all_special_ids))),
        ("eos_token_id", fast.eos_token_id, hf.eos_token_id),
        ("bos_token_id", fast.bos_token_id, hf.bos_token_id),
        ("chat_template", fast.chat_template, getattr(hf, "chat_template", None)),
        ("added special ids", sorted(i for i, t in fast.added_tokens_decoder.items() if t.special),
         sorted(i for i, t in hf.added_tokens_decoder.items() if getattr(t, "special", False))),
    ]
    ids: list[int] = []
    for text in PROBE_TEXTS:
        for special in (True, False):
            a = fast(text, add_special_tokens=special, return_offsets_mapping=True)
            b = hf(text, add_special_tokens=special, return_offsets_mapping=True)
            checks.append((f"encode {text!r} special={special}", a["input_ids"], list(b["input_ids"])))
            checks.append((f"offsets {text!r}", [tuple(o) for o in a["offset_mapping"]],
                           [tuple(o) for o in b["offset_mapping"]]))
            ids = list(b["input_ids"])
            for skip in (True, False):
                checks.append((f"decode {ids} skip={skip}", fast.decode(ids, skip_special_tokens=skip),
                               hf.decode(ids, skip_special_tokens=skip)))
                checks.append((f"decode {ids} skip={skip} no cleanup",
                               fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False),
                               hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)))
    sample = sorted({*range(min(len(hf), 300)), *range(max(0, len(hf) - 300), len(hf) + 2),
                     *fast.all_special_ids})
    for i in sample:
        token = hf.convert_ids_to_tokens(i)
        checks.append((f"token {i}", fast.convert_ids_to_tokens(i), token))
        if isinstance(token, str):
            checks.append((f"token string {i}", fast.convert_tokens_to_string([token]),
                           hf.convert_tokens_to_string([token])))
            checks.append((f"decode [{i}]", fast.decode([i], skip_special_tokens=True,
                                                        clean_up_tokenization_spaces=False),
                           hf.decode([i], skip_special_tokens=True, clean_up_tokenization_spaces=False)))
    for name, a, b in checks:
        if a != b:
            return f"{name}: {a!r} != {b!r}"
    if getattr(hf, "chat_template", None):
        for chat in PROBE_CHATS:
            for gen in (True, False):
                for tools in (None, PROBE_TOOLS):
                    try:
                        want = hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen)
                    except Exception:  # noqa: BLE001 - a template may refuse a probe; ours must too
                        want = None
                    try:
                        got = fast.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen)
                    except Exception:  # noqa: BLE001
                        got = None
                    if got != want:
                        return f"chat template on {chat!r} (tools={tools is not None}, generation={gen})"
    return None
