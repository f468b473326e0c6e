"""Quantized models end to end: tiny random models quantized at load and a tiny GGUF kept in
its format, against transformers running the same (exactly dequantized) weights in fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from oracle import hf_greedy, load_hf_model
from quant_oracle import livelm_logits, resident_weight_bytes, write_dequantized_hf_dir
from test_gguf import write_gguf
from tiny_models import _CORPUS, build_tiny_model
from torch import nn

from livelm.engine.llm import LLM
from livelm.layers.quantized import QuantEmbedding, QuantizedModule, QuantLinear
from livelm.models.loader import load_model
from livelm.quant import matmul
from livelm.quant.formats import QUANTIZE_FORMATS
from livelm.sampling_params import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture(params=["compiled", "fallback"])
def kernel_path(request, monkeypatch) -> str:
    """The C++ kernels, then the pure-torch fallback."""
    if request.param == "compiled" and matmul.quant_linear_kernels() is None:
        pytest.skip("the C++ quantized kernels could not be built here")
    if request.param == "fallback":
        monkeypatch.setattr(matmul, "quant_linear_kernels", lambda: None)
    return request.param


def _prompt_ids(llm_or_tok, text: str) -> list[int]:
    tok = getattr(llm_or_tok, "tokenizer", llm_or_tok)
    return tok.encode(text)


@pytest.mark.parametrize(
    ("arch", "fmt"),
    [("llama", f) for f in QUANTIZE_FORMATS] + [("qwen2", "q8_0"), ("qwen3", "q4_0")],
)
def test_quantized_logits_match_transformers(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, kernel_path: str, arch: str, fmt: str
) -> None:
    src = tiny_model_dirs[arch]
    model = load_model(src, torch.float32, CPU, 256, quantization=fmt)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedModule)]
    assert quantized and all(m.fmt == fmt for m in quantized)
    assert not any(type(m) is nn.Linear for m in model.modules())
    hf = load_hf_model(write_dequantized_hf_dir(model, src, tmp_path / "deq"))
    ids = list(range(3, 70, 3))  # 23 tokens: the prefill pass takes the tiled GEMM path
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0].float()
    for one_at_a_time in (False, True):
        got = livelm_logits(model, ids, one_token_at_a_time=one_at_a_time)
        assert (got - want).abs().max() < 1e-3, one_at_a_time


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_engine_greedy_matches_transformers(tiny_model_dirs: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    src = tiny_model_dirs["llama"]
    llm = LLM(str(src), quantization=fmt, kv_cache_gib=0.05)
    model = llm.engine.runner.model
    hf = load_hf_model(write_dequantized_hf_dir(model, src, tmp_path / "deq"))
    prompts = [_prompt_ids(llm, text) for text in _CORPUS[:3]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_gguf_keeps_its_format(tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import gguf
    from gguf import GGUFReader

    monkeypatch.setenv("LIVELM_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_model_dirs["llama"]
    path = write_gguf(src, tmp_path / "tiny-q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), kv_cache_gib=0.05)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1 and all(m.fmt == "q8_0" for m in linears)  # + the untied LM head
    assert isinstance(model.embed_tokens, QuantEmbedding)

    # The weights are GGUF's own dequantized values (q rows un-permuted back to HF order).
    reader = GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    want = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    assert torch.equal(matmul.dequantize_rows(model.layers[0].self_attn.o_proj.qweight, 0, 64), want)

    # Resident weights: the GGUF's tensor bytes (+10%), no float copies left behind.
    gguf_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert resident_weight_bytes(model) <= 1.1 * gguf_bytes

    hf = load_hf_model(write_dequantized_hf_dir(model, llm.engine.model_dir, tmp_path / "deq"))
    prompts = [_prompt_ids(llm, text) for text in _CORPUS[:3]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)

    # quantization="none" dequantizes the same blocks into float layers: the same tokens.
    plain = LLM(str(path), kv_cache_gib=0.05, quantization="none")
    assert not any(isinstance(m, QuantizedModule) for m in plain.engine.runner.model.modules())
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in outs
    ]


@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
def test_resident_memory_is_the_quantized_bytes(tiny_model_dirs: dict[str, Path], fmt: str) -> None:
    from livelm.quant.formats import bytes_per_weight

    llm = LLM(str(tiny_model_dirs["qwen2"]), quantization=fmt, kv_cache_gib=0.05)  # tied embeddings
    runner = llm.engine.runner
    model = runner.model
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.lm_head.qs is model.embed_tokens.qs
    expected = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedModule) and mod is not model.lm_head:
            expected += mod.out_features * mod.in_features * bytes_per_weight(fmt)
            expected += 4 * mod.out_features if fmt == "int8" else 0
    expected += sum(p.numel() * 4 for p in model.parameters())  # norms and biases stay fp32
    resident = resident_weight_bytes(model) + (resident_weight_bytes(runner.tied_head) if runner.tied_head else 0)
    assert resident <= 1.1 * expected


def test_bad_quantization_names_what_is_supported(tiny_model_dirs: dict[str, Path]) -> None:
    # q4_k is a real format, kept from GGUF files, but livelm has no quantizer for it.
    for name in ("q3_k", "q4_k"):
        with pytest.raises(ValueError, match=rf"{name}.*supported: auto, none, q8_0, q4_0, q4_1, int8, q5_0, q5_1$"):
            LLM(str(tiny_model_dirs["llama"]), quantization=name)
        with pytest.raises(ValueError, match=rf"{name}.*supported: auto, none, q8_0, q4_0, q4_1, int8, q5_0, q5_1$"):
            load_model(tiny_model_dirs["llama"], torch.float32, CPU, 64, quantization=name)


def test_layers_that_do_not_fit_blocks_stay_float_with_a_log_line(tmp_path: Path, caplog) -> None:
    # hidden 48: rows of q/k/v, gate/up and the LM head are not whole 32-weight blocks.
    src = build_tiny_model(tmp_path / "odd", "llama", hidden_size=48, intermediate_size=64)
    with caplog.at_level(logging.WARNING, logger="livelm"):
        model = load_model(src, torch.float32, CPU, 64, quantization="q4_0")
    assert type(model.layers[0].self_attn.qkv_proj) is nn.Linear
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)  # 64 inputs: two blocks
    assert "layers.0.self_attn.qkv_proj stays in float" in caplog.text
    # int8 has no blocks: every layer fits.
    model = load_model(src, torch.float32, CPU, 64, quantization="int8")
    assert isinstance(model.layers[0].self_attn.qkv_proj, QuantLinear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_quantized_engine_matches_cpu(tiny_model_dirs: dict[str, Path]) -> None:
    prompts = [list(range(3, 40, 2)), [5, 9, 11]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(tiny_model_dirs["llama"]), quantization="q8_0", device=device, dtype="float32",
                  kv_cache_gib=0.05, gpu_memory_utilization=0.1)
        tokens[device] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["cuda"] == tokens["cpu"]
