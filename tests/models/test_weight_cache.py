"""The on-disk cache of weights quantized at load (livelm/models/weight_cache.py): a second
load reads the cached tensors instead of quantizing, bit for bit the same model; a changed
checkpoint, a damaged entry, an unwritable directory or the off switch never give a wrong
or failed load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model

from livelm.engine.llm import LLM
from livelm.models import loader
from livelm.models.loader import load_model
from livelm.sampling_params import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny Llama of this test's own (tests below rewrite its weights)."""
    return build_tiny_model(tmp_path / "model", "llama")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "weight-cache"
    monkeypatch.setenv("LIVELM_WEIGHT_CACHE_DIR", str(path))
    return path


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.safetensors"))


def _load(model_dir: Path, quantization: str) -> dict[str, torch.Tensor]:
    model = load_model(model_dir, torch.float32, CPU, 128, quantization=quantization)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _count_quantize_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = loader.quantize

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "quantize", counting)
    return calls


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_second_load_reads_the_cache_bit_for_bit(model_dir, cache_dir, monkeypatch, fmt) -> None:
    calls = _count_quantize_calls(monkeypatch)
    first = _load(model_dir, fmt)
    assert calls[0] > 0
    (entry,) = _entries(cache_dir)
    assert entry.name.startswith(f"{fmt}-")
    calls[0] = 0
    second = _load(model_dir, fmt)
    assert calls[0] == 0, "the cached load quantized again"
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_formats_have_their_own_entries_and_float_loads_write_none(model_dir, cache_dir) -> None:
    _load(model_dir, "none")
    _load(model_dir, "auto")  # a float checkpoint under auto: nothing quantized
    assert _entries(cache_dir) == []
    _load(model_dir, "q8_0")
    _load(model_dir, "q4_0")
    assert sorted(p.name.split("-")[0] for p in _entries(cache_dir)) == ["q4_0", "q8_0"]


def test_greedy_output_is_the_same_from_the_cache(model_dir, cache_dir) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = ["The quick brown fox", "Once upon a time"]
    outputs = []
    for _ in range(2):
        llm = LLM(model=str(model_dir), quantization="q8_0", max_model_len=128, kv_cache_gib=0.01)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        del llm
    assert len(_entries(cache_dir)) == 1
    assert outputs[0] == outputs[1]


def test_a_rewritten_checkpoint_misses_and_replaces_the_old_entry(model_dir, cache_dir, monkeypatch) -> None:
    _load(model_dir, "q8_0")
    (old_entry,) = _entries(cache_dir)
    weights_file = model_dir / "model.safetensors"
    tensors = load_file(weights_file)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 2  # same shapes: only size/mtime/content differ
    save_file(tensors, weights_file, metadata={"format": "pt"})
    calls = _count_quantize_calls(monkeypatch)
    reloaded = _load(model_dir, "q8_0")
    assert calls[0] > 0, "a rewritten checkpoint was served from the old entry"
    (new_entry,) = _entries(cache_dir)
    assert new_entry != old_entry
    fresh_dir = model_dir.parent / "fresh-copy"
    shutil.copytree(model_dir, fresh_dir)
    monkeypatch.setenv("LIVELM_DISABLE_WEIGHT_CACHE", "1")
    expected = _load(fresh_dir, "q8_0")
    for key in expected:
        assert torch.equal(expected[key], reloaded[key]), key


def test_a_damaged_entry_is_replaced(model_dir, cache_dir, monkeypatch, caplog) -> None:
    want = _load(model_dir, "q8_0")
    (entry,) = _entries(cache_dir)
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated, as by a full disk
    calls = _count_quantize_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="livelm"):
        got = _load(model_dir, "q8_0")
    assert "unreadable" in caplog.text
    assert calls[0] > 0
    for key in want:
        assert torch.equal(want[key], got[key]), key
    (rewritten,) = _entries(cache_dir)
    assert rewritten.stat().st_size > 1000


def test_an_unwritable_cache_costs_a_warning_not_the_load(model_dir, tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv("LIVELM_WEIGHT_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="livelm"):
        state = _load(model_dir, "q8_0")
    assert "could not write the quantized weight cache" in caplog.text
    assert state
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


def test_the_off_switch_writes_nothing(model_dir, cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("LIVELM_DISABLE_WEIGHT_CACHE", "1")
    _load(model_dir, "q8_0")
    assert not cache_dir.exists() or _entries(cache_dir) == []
