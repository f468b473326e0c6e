"""Reusable model building blocks: attention over the paged KV cache (with its backends),
fused norm/activation/rotary ops, packed fp32 linears and quantized linears/embeddings.
Built on the kernel floor and quant; the models assemble them."""
