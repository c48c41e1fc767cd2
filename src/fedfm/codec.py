"""Messages between server and clients: tensors <-> bytes, with exact byte accounting.

Every update and every broadcast goes through ``encode``/``decode`` in every engine, so the bytes
reported in metrics are the length of the real serialized message (safetensors format), not an
estimate. Compression, DP and secure-aggregation stages plug in here as further encode/decode steps.
"""

from __future__ import annotations

from safetensors.torch import load, save

from fedfm.types import Weights


def encode(weights: Weights) -> bytes:
    """Serialize named tensors (safetensors: 8-byte header length, JSON header, raw little-endian data)."""
    return save({k: v.contiguous() for k, v in weights.items()})


def decode(message: bytes) -> Weights:
    """Inverse of ``encode``; raises ValueError on a malformed message."""
    try:
        return load(message)
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise ValueError(f"malformed tensor message: {exc}") from None
