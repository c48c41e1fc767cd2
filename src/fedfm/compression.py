"""Update codecs: a client's update leaves as a compressed message, counted byte for byte.

A codec is a short pipeline over the update flattened in sorted tensor-name order (both sides know the
names and shapes of the trainable tensors, so the message carries none of them):

    [topk | randk: keep a fraction of the coordinates]  ->  [one value codec]  ->  message tensors

Sparsifiers: ``topk`` keeps the largest magnitudes; its indices travel as uint16 offsets inside
65,536-coordinate chunks plus a per-chunk count (2 bytes per kept coordinate, where raw int32/int64 indices
would take 4 or 8). ``randk`` keeps a random subset drawn from a seed that travels instead of the indices (8
bytes in all; the random mask of Konecny et al. 2016, "Federated Learning: Strategies for Improving
Communication Efficiency"). Both send the kept values unscaled, so both are biased (randk: E[decoded] =
topk_fraction x update, not rescaled by 1/fraction as in Konecny et al.'s unbiased variant): meant to be used
with error feedback, which sends the rest later.

Value codecs: ``fp16``/``bf16`` (casts), ``int8``/``int4`` (blockwise absmax scales with *stochastic
rounding*, E[decoded] = input, so quantisation adds noise but no bias; int4 packs two values per byte),
``sign`` (1 bit per value and one scale per block, the block's mean |value|: 1-bit SGD, Seide et al. 2014;
EF-SignSGD, Karimireddy et al. 2019; biased, so meant to be used with error feedback).

Error feedback (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019): a client adds its residual
``e`` to the update before compressing and keeps ``e <- (delta + e) - decoded`` for the next round, so
whatever compression drops (coordinates outside the top-k, rounding error) is sent later rather than lost.

Composition with the other stages of an update (``fedfm.app`` runs them in this order at the client):
train -> [attack, simulated Byzantine clients] -> compress (+ error feedback) -> message. The server decodes
and *then* screens (shapes, NaN/Inf, norm outliers) and, under central DP, clips each decoded update to C
itself before adding noise, so the sensitivity bound holds whatever the codec's rounding did. Secure
aggregation needs dense field vectors and is refused with compression by config validation.

The message is a dict of tensors serialized by ``fedfm.codec`` (safetensors); written by hand because no
library we use offers top-k with error feedback or stochastic-rounding quantisation of a flat update.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedfm.types import Weights

KEY = "__codec__."  # prefix of every tensor of a compressed message
CHUNK = 1 << 16  # top-k offsets are uint16 within chunks of this many coordinates
QMAX = {"int8": 127, "int4": 7}


def flatten(weights: Weights) -> torch.Tensor:
    """The tensors concatenated in sorted-name order, float32 (the coordinate order of every message)."""
    if not weights:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([weights[k].detach().reshape(-1).float() for k in sorted(weights)])


def unflatten(vector: torch.Tensor, reference: Weights) -> Weights:
    out, at = {}, 0
    for k in sorted(reference):
        n = reference[k].numel()
        out[k] = vector[at : at + n].reshape(reference[k].shape).clone()
        at += n
    return out


# --- value codecs ----------------------------------------------------------------------------------
def quantize(x: torch.Tensor, bits: str, block: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation with stochastic rounding: q = floor(x / s + u), u ~ U[0, 1), s = max|x| / qmax.

    Returns (codes, scales): int8 codes, or for int4 uint8 bytes holding two codes each (code + 8 in a nibble).
    """
    qmax = QMAX[bits]
    n = x.numel()
    blocks = math.ceil(n / block)
    padded = torch.zeros(blocks * block)
    padded[:n] = x
    padded = padded.view(blocks, block)
    scale = padded.abs().amax(dim=1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.rand(padded.shape, generator=generator)
    q = torch.floor(padded / safe[:, None] + u).clamp_(-qmax, qmax).to(torch.int8).reshape(-1)[:n]
    if bits == "int4":
        nib = (q.to(torch.int16) + 8).to(torch.uint8)
        if n % 2:
            nib = torch.cat([nib, torch.full((1,), 8, dtype=torch.uint8)])
        q = nib[0::2] | (nib[1::2] << 4)
    return q, scale.float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: str, n: int, block: int) -> torch.Tensor:
    if bits == "int4":
        if codes.dtype != torch.uint8 or codes.numel() != (n + 1) // 2:
            raise ValueError(f"int4 codes: expected {(n + 1) // 2} uint8 bytes, got {codes.numel()} {codes.dtype}")
        lo, hi = (codes & 0x0F).to(torch.int16) - 8, (codes >> 4).to(torch.int16) - 8
        q = torch.stack([lo, hi], dim=1).reshape(-1)[:n]
    else:
        if codes.dtype != torch.int8 or codes.numel() != n:
            raise ValueError(f"int8 codes: expected {n} int8 values, got {codes.numel()} {codes.dtype}")
        q = codes.to(torch.int16)
    if q.abs().max() > QMAX[bits] if n else False:
        raise ValueError(f"{bits} codes outside [-{QMAX[bits]}, {QMAX[bits]}]")
    blocks = math.ceil(n / block)
    if scales.dtype != torch.float32 or scales.numel() != blocks:
        raise ValueError(f"{bits} scales: expected {blocks} float32 values, got {scales.numel()} {scales.dtype}")
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(f"{bits} scales must be finite and non-negative")
    return (q.float() * scales.repeat_interleave(block)[:n]).float()


def sign_encode(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 bit per value (1: >= 0) packed 8 per byte, and each block's mean |value| as its scale."""
    n = x.numel()
    blocks = math.ceil(n / block)
    padded = torch.zeros(blocks * block)
    padded[:n] = x
    scales = padded.view(blocks, block).abs().sum(dim=1) / torch.tensor(
        [min(block, n - b * block) for b in range(blocks)], dtype=torch.float32
    )
    bits = torch.from_numpy(np.packbits((x >= 0).numpy().astype(np.uint8)))
    return bits, scales.float()


def sign_decode(bits: torch.Tensor, scales: torch.Tensor, n: int, block: int) -> torch.Tensor:
    if bits.dtype != torch.uint8 or bits.numel() != (n + 7) // 8:
        raise ValueError(f"sign bits: expected {(n + 7) // 8} uint8 bytes, got {bits.numel()} {bits.dtype}")
    blocks = math.ceil(n / block)
    if scales.dtype != torch.float32 or scales.numel() != blocks:
        raise ValueError(f"sign scales: expected {blocks} float32 values, got {scales.numel()} {scales.dtype}")
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise ValueError("sign scales must be finite and non-negative")
    signs = torch.from_numpy(np.unpackbits(bits.numpy())[:n].astype(np.float32)) * 2 - 1
    return signs * scales.repeat_interleave(block)[:n]


def _encode_values(x: torch.Tensor, codec: str | None, block: int, generator: torch.Generator) -> Weights:
    if codec == "sign":
        bits, scales = sign_encode(x, block)
        return {KEY + "bits": bits, KEY + "scales": scales}
    if codec is None:
        return {KEY + "values": x.float()}
    if codec == "fp16":  # clamped to fp16's range: an overflow would become inf (error feedback keeps the excess)
        return {KEY + "values": x.clamp(-65504.0, 65504.0).to(torch.float16)}
    if codec == "bf16":
        return {KEY + "values": x.to(torch.bfloat16)}
    codes, scales = quantize(x, codec, block, generator)
    return {KEY + "codes": codes, KEY + "scales": scales}


def _decode_values(message: Weights, codec: str | None, n: int, block: int) -> torch.Tensor:
    if codec in (None, "fp16", "bf16"):
        v = message.get(KEY + "values")
        want = {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[codec]
        if v is None or v.dtype != want or v.numel() != n:
            got = "nothing" if v is None else f"{v.numel()} {v.dtype}"
            raise ValueError(f"expected {n} {want} values, got {got}")
        return v.float().reshape(-1)
    if codec == "sign":
        bits, scales = message.get(KEY + "bits"), message.get(KEY + "scales")
        if bits is None or scales is None:
            raise ValueError("sign message lacks bits or scales")
        return sign_decode(bits.reshape(-1), scales.reshape(-1), n, block)
    codes, scales = message.get(KEY + "codes"), message.get(KEY + "scales")
    if codes is None or scales is None:
        raise ValueError(f"{codec} message lacks codes or scales")
    return dequantize(codes.reshape(-1), scales.reshape(-1), codec, n, block)


# --- top-k sparsification --------------------------------------------------------------------------
def topk_indices(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of the ceil(fraction * n) largest |x| (ties broken by torch.topk, deterministic on CPU)."""
    k = max(1, math.ceil(fraction * x.numel()))
    return torch.topk(x.abs(), k, sorted=False).indices.sort().values


def encode_indices(idx: torch.Tensor, n: int) -> Weights:
    """Sorted indices -> uint16 offsets within 65,536-coordinate chunks + int32 count per chunk."""
    chunks = math.ceil(n / CHUNK)
    counts = torch.bincount(idx // CHUNK, minlength=chunks).to(torch.int32)
    offsets = torch.from_numpy((idx % CHUNK).numpy().astype(np.uint16))
    return {KEY + "offsets": offsets, KEY + "counts": counts}


def decode_indices(message: Weights, n: int) -> torch.Tensor:
    offsets, counts = message.get(KEY + "offsets"), message.get(KEY + "counts")
    chunks = math.ceil(n / CHUNK)
    if offsets is None or counts is None or offsets.dtype != torch.uint16 or counts.dtype != torch.int32:
        raise ValueError("top-k message needs uint16 offsets and int32 counts")
    counts = counts.reshape(-1).long()
    if counts.numel() != chunks or (counts < 0).any() or int(counts.sum()) != offsets.numel():
        raise ValueError(f"top-k counts do not match: {counts.numel()} chunks for {chunks}, {offsets.numel()} offsets")
    base = torch.repeat_interleave(torch.arange(chunks) * CHUNK, counts)
    idx = base + offsets.reshape(-1).to(torch.int64)
    if idx.numel() and (idx.max() >= n or (idx.numel() > 1 and (idx[1:] <= idx[:-1]).any())):
        raise ValueError("top-k indices must be strictly increasing and inside the update")
    return idx


def randk_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a random ceil(fraction * n)-subset, a pure function of the seed (both sides draw it)."""
    k = max(1, math.ceil(fraction * n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


# --- the codec -------------------------------------------------------------------------------------
class UpdateCodec:
    """Encode a client's update into message tensors; decode messages back to dense updates.

    ``stages`` is ``compression.up`` (validated: optional 'topk' first, then at most one value codec).
    ``reference`` gives the names and shapes of the trainable tensors (the global model's).
    """

    def __init__(self, stages: list[str], reference: Weights, topk_fraction: float = 0.01, block_size: int = 256):
        self.topk = "topk" in stages
        self.randk = "randk" in stages
        values = [s for s in stages if s not in ("topk", "randk")]
        self.values = values[0] if values else None
        self.fraction, self.block = topk_fraction, block_size
        self.shapes = {k: tuple(v.shape) for k, v in reference.items()}
        self.n = sum(v.numel() for v in reference.values())
        self.reference = {k: torch.empty(s) for k, s in self.shapes.items()}

    def encode(self, delta: Weights, generator: torch.Generator) -> tuple[Weights, Weights]:
        """(message tensors, what the server will decode from them): the second is exact, for error feedback."""
        x = flatten(delta)
        message: Weights = {}
        if self.topk:
            idx = topk_indices(x, self.fraction)
            message.update(encode_indices(idx, self.n))
            vals = x[idx]
        elif self.randk:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            message[KEY + "seed"] = torch.tensor([seed], dtype=torch.int64)
            vals = x[randk_indices(self.n, self.fraction, seed)]
        else:
            vals = x
        message.update(_encode_values(vals, self.values, self.block, generator))
        return message, self.decode(message)

    def decode(self, message: Weights) -> Weights:
        """Dense update of the reference's shapes; ValueError (with the reason) on a malformed message."""
        unknown = [k for k in message if not k.startswith(KEY)]
        if unknown:
            raise ValueError(f"not a compressed message: unexpected tensor {unknown[0]}")
        if self.topk or self.randk:
            idx = decode_indices(message, self.n) if self.topk else self._seeded(message)
            vals = _decode_values(message, self.values, idx.numel(), self.block)
            x = torch.zeros(self.n)
            x[idx] = vals
        else:
            x = _decode_values(message, self.values, self.n, self.block)
        return unflatten(x, self.reference)

    def _seeded(self, message: Weights) -> torch.Tensor:
        seed = message.get(KEY + "seed")
        if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or int(seed) < 0:
            raise ValueError("randk message needs one non-negative int64 seed")
        return randk_indices(self.n, self.fraction, int(seed))

    @staticmethod
    def is_message(delta: Weights) -> bool:
        return bool(delta) and all(k.startswith(KEY) for k in delta)


def with_feedback(codec: UpdateCodec, delta: Weights, residual: Weights | None, generator: torch.Generator):
    """Error feedback: compress delta + residual; returns (message, new residual = input - decoded)."""
    target = delta if residual is None else {k: delta[k] + residual[k] for k in delta}
    message, decoded = codec.encode(target, generator)
    return message, {k: target[k] - decoded[k] for k in target}


def cast_broadcast(weights: Weights, precision: str) -> Weights:
    """The downlink: global trainable tensors in fp16/bf16 ('none' keeps float32)."""
    if precision == "none":
        return weights
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return {k: v.to(dtype) for k, v in weights.items()}
