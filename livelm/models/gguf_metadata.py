"""Reading a GGUF file's metadata values (gguf-version independent)."""

from __future__ import annotations

from typing import Any

import numpy as np


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, string or list; ``default`` when absent."""
    entry = reader.fields.get(key)
    if entry is None or not entry.data:
        return default
    from gguf import GGUFValueType

    def value(part: np.ndarray, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if vtype == GGUFValueType.FLOAT32:
            # The shortest decimal that rounds to this float32: 1e-05 rather than
            # 9.999999747378752e-06, the value the original config.json held.
            return float(str(part[0]))
        return part.tolist()[0]

    if entry.types[0] == GGUFValueType.ARRAY:
        return [value(entry.parts[i], entry.types[-1]) for i in entry.data]
    return value(entry.parts[entry.data[0]], entry.types[0])


def require(reader: Any, key: str, family: str) -> Any:
    """The value of metadata ``key``; ValueError naming it when the file lacks it."""
    got = field(reader, key)
    if got is None:
        raise ValueError(f"GGUF file of a {family} model lacks metadata key {key!r}")
    return got
