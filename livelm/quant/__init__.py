"""Quantized weights: formats, storage, planning which layers are quantized, and the
matmuls over them (pure functions; the nn.Modules that hold them are in livelm.layers)."""
