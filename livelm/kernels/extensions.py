"""The compiled C++ modules, one cached loader each: the module, or None (said once in the
log) when it cannot be built or ``LIVELM_DISABLE_CPP_KERNELS=1``.

Each source compiles into a module of its own, so each can change (and rebuild) alone.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from livelm.kernels.build import build_extension, compile_extension

logger = logging.getLogger("livelm")


@functools.cache
def decode_attention_kernels() -> ModuleType | None:
    """``csrc/paged_attention.cpp``: decode attention over the paged KV cache
    (``paged_decode_attention_out``), fp32."""
    return build_extension("livelm_decode_attention", "paged_attention.cpp", "decode attention")


@functools.cache
def prefill_attention_kernels() -> ModuleType | None:
    """``csrc/prefill_attention.cpp``: causal prefill attention reading K/V through slots in
    place (``prefill_attention``) and the K/V cache write (``write_kv``), fp32, head_dim % 16 == 0."""
    return build_extension("livelm_prefill_attention", "prefill_attention.cpp", "prefill attention")


@functools.cache
def sinks_attention_kernels() -> ModuleType | None:
    """``csrc/sinks_attention.cpp``: attention of a kv_policy "sinks" chunk
    (``sinks_attention``: keys rotated by cache position as they are read), fp32."""
    return build_extension("livelm_sinks_attention", "sinks_attention.cpp", "sinks attention", ("-ffp-contract=off",))


@functools.cache
def fused_ops_kernels() -> ModuleType | None:
    """``csrc/fused_ops.cpp``: RMSNorm, residual add + RMSNorm, SiLU-and-multiply and
    in-place rotary, fp32."""
    # No FMA contraction: the kernels round like the separate torch ops they replace.
    return build_extension("livelm_fused_ops", "fused_ops.cpp", "norm/SiLU/rotary", ("-ffp-contract=off",))


@functools.cache
def quant_linear_kernels() -> ModuleType | None:
    """``csrc/quant_linear.cpp``: matmuls over quantized weights (``quantized_matmul``),
    exact dequantization (``dequantize_rows``) and, in AVX-512 builds, the fp32 panel GEMM
    (``fp32_pack``, ``fp32_linear``); ``simd()`` names the instruction set it was built for."""
    ext = build_extension("livelm_quant_linear", "quant_linear.cpp", "quantized layers")
    if ext is None:
        return None
    logger.info("C++ quantized kernels compiled for %s", ext.simd())
    return ext


@functools.cache
def int8_linear_kernels() -> ModuleType | None:
    """``csrc/int8_linear.cpp``: matmuls of int8-quantized activations with q8_0/q4_0/q4_1
    weights (``quantize_activations``, ``int8_matmul``, ``int8_linear``); ``simd()`` names
    the integer dot product it was built for (``avx512-vnni``, ``avx2`` or ``scalar``)."""
    ext = build_extension("livelm_int8_linear", "int8_linear.cpp", "int8-activation layers")
    if ext is None:
        return None
    logger.info("C++ int8-activation kernels compiled for %s", ext.simd())
    return ext


def build_int8_linear_kernels(name: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load the cached build of) ``csrc/int8_linear.cpp`` as module ``name``;
    raises when it cannot be built (the tests build AVX2-only and scalar copies)."""
    return compile_extension(name, "int8_linear.cpp", extra_cflags)


def build_quant_linear_kernels(name: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load the cached build of) ``csrc/quant_linear.cpp`` as module ``name``;
    raises when it cannot be built.

    ``extra_cflags`` can narrow the instruction set (the tests build an AVX2-only copy with
    ``-mno-avx512f`` to check that path on an AVX-512 machine)."""
    return compile_extension(name, "quant_linear.cpp", extra_cflags)
