"""Loading a model's tokenizer (issue 21): the first load of a directory goes through
AutoTokenizer and remembers the class it chose, and whether livelm's FastTokenizer
(``tokenizers`` + jinja2, no transformers import) agreed with it on every probe; later
loads use the FastTokenizer where it agreed, else call the remembered class directly.
Either way the result must behave as the tokenizer AutoTokenizer builds, on the default
model and on the tiny test models, in everything the engine and server use; anything the
cache cannot vouch for goes through AutoTokenizer again."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import transformers
from transformers import AutoTokenizer

from livelm.engine import tokenizer_class_cache
from livelm.engine.fast_tokenizer import FastTokenizer, first_difference
from livelm.engine.tokenizer import installed_transformers_version, load_tokenizer
from livelm.models.resolve import resolve_model_path

TEXTS = ["", "Hello  world\n\n  tabs\tand spaces ", "<|im_start|>user\nhi<|im_end|>", "é 日本語 🙂 ÿ",
         "def f(x):\n    return x ** 2  # ok", "   leading", "trailing   "]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b> é"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again?"}],
]


@pytest.fixture
def class_cache(tmp_path, monkeypatch):
    """A livelm cache directory of the test's own (the default model stays where it is)."""
    default_model = resolve_model_path(None)
    monkeypatch.setenv("LIVELM_CACHE_DIR", str(tmp_path / "cache"))
    return default_model


def auto_calls(monkeypatch) -> list:
    calls = []
    original = AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    return calls


@pytest.mark.parametrize("name", ["default", "llama", "qwen2", "qwen3"])
def test_the_remembered_class_builds_the_tokenizer_autotokenizer_builds(tiny_model_dirs, class_cache,
                                                                        monkeypatch, name) -> None:
    d = {**tiny_model_dirs, "default": class_cache}[name]
    calls = auto_calls(monkeypatch)
    first = load_tokenizer(d)
    assert len(calls) == 1  # the first load asks AutoTokenizer...
    ours = load_tokenizer(d)
    assert len(calls) == 1  # ...later ones do not
    assert tokenizer_class_cache.cached_class(d, transformers.__version__) is type(first)
    ref = AutoTokenizer.from_pretrained(str(d))
    assert type(first) is type(ref)
    # transformers 5 builds Qwen2's pre-tokenizer itself instead of reading tokenizer.json's
    # (digits split one by one), which FastTokenizer does not copy: that one stays on
    # transformers, found by the probes rather than by a list of classes.
    agrees = name != "qwen2"
    assert tokenizer_class_cache.fast_tokenizer_agrees(d, transformers.__version__) is agrees
    assert isinstance(ours, FastTokenizer) is agrees
    for text in TEXTS:
        for special in (True, False):
            a = ours(text, add_special_tokens=special, return_offsets_mapping=True)
            b = ref(text, add_special_tokens=special, return_offsets_mapping=True)
            assert a.input_ids == b.input_ids and a.offset_mapping == b.offset_mapping
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_string(ours.convert_ids_to_tokens(ids)) == \
            ref.convert_tokens_to_string(ref.convert_ids_to_tokens(ids))
    assert ours.all_special_ids == ref.all_special_ids
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (ref.eos_token_id, ref.bos_token_id,
                                                                         ref.pad_token_id)
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    assert ours.chat_template == ref.chat_template
    if ref.chat_template:
        for chat in CHATS:
            for gen in (True, False):
                assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                    ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)


def test_what_the_cache_cannot_vouch_for_goes_through_autotokenizer(tiny_model_dirs, class_cache, tmp_path,
                                                                    monkeypatch) -> None:
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], d)
    version = transformers.__version__
    calls = auto_calls(monkeypatch)
    load_tokenizer(d)
    load_tokenizer(d)
    assert len(calls) == 1
    # A changed tokenizer_config.json (size or time), another transformers version: ask again.
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=4))
    assert tokenizer_class_cache.cached_class(d, version) is None
    load_tokenizer(d)
    assert len(calls) == 2
    assert tokenizer_class_cache.cached_class(d, version) is not None
    assert tokenizer_class_cache.cached_class(d, version + ".other") is None
    # A cache naming a class outside transformers, or a broken cache file, is ignored.
    path = tokenizer_class_cache._cache_path()
    entries = json.loads(path.read_text())
    path.write_text(json.dumps({key: "os:system" for key in entries}))
    assert tokenizer_class_cache.cached_class(d, version) is None
    path.write_text("{not json")
    assert tokenizer_class_cache.cached_class(d, version) is None
    load_tokenizer(d)
    assert len(calls) == 3


def test_the_cache_keeps_a_bounded_number_of_directories(tiny_model_dirs, class_cache, tmp_path,
                                                         monkeypatch) -> None:
    monkeypatch.setattr(tokenizer_class_cache, "MAX_ENTRIES", 3)
    tok = load_tokenizer(tiny_model_dirs["llama"])
    for i in range(5):
        tokenizer_class_cache.remember_class(tmp_path / f"m{i}", transformers.__version__, tok)
    assert len(json.loads(tokenizer_class_cache._cache_path().read_text())) == 3


def test_the_fast_tokenizer_start_never_imports_transformers(tiny_model_dirs, class_cache, tmp_path) -> None:
    """Once a directory is known to agree, building an engine on it and answering a chat
    message loads no transformers module at all (~0.7 s of every start)."""
    import subprocess
    import sys

    d = tiny_model_dirs["llama"]
    load_tokenizer(d)  # the first load checks and records the agreement
    code = f"""
import sys
from livelm import LLM, SamplingParams
llm = LLM({str(d)!r}, max_model_len=128, num_kv_blocks=16)
out = llm.chat([{{"role": "user", "content": "hi"}}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
assert len(out[0].outputs[0].token_ids) == 4
print("TRANSFORMERS", sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "TRANSFORMERS []" in out.stdout, out.stdout + out.stderr


def test_the_probes_find_a_template_or_encoding_that_differs(tiny_model_dirs) -> None:
    """first_difference names what differs: an edited chat template, a changed pre-tokenizer."""
    d = tiny_model_dirs["llama"]
    ref = AutoTokenizer.from_pretrained(str(d))
    fast = FastTokenizer.from_dir(d)
    assert first_difference(fast, ref) is None
    fast.chat_template = ref.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert "chat_template" in first_difference(fast, ref)
    other = FastTokenizer.from_dir(d)
    from tokenizers import pre_tokenizers

    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), other.backend_tokenizer.pre_tokenizer])
    assert first_difference(other, ref).startswith("encode")


def test_the_version_is_read_without_importing_transformers() -> None:
    assert installed_transformers_version() == transformers.__version__
