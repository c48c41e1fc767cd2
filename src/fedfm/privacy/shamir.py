"""Shamir secret sharing (t-of-n) of short byte strings, for secure aggregation.

Written by hand: `cryptography` has no secret sharing and no maintained library in our stack does it.
The scheme is textbook Shamir (1979) over the prime field GF(q), q = 2**21 - 9, applied word by word:
a secret of 2*L bytes is read as L little-endian 16-bit words and every word gets its own random
polynomial of degree t-1 (independent coefficients), so each word is perfectly hidden from any t-1
shares, exactly as in the byte-wise GF(256) scheme of HashiCorp Vault, only with room for 2**21 - 10
holders instead of 255. Share number x (x = 1..n) holds the L polynomial values at x, stored as
little-endian uint32 words (values < q).

Why this field: q < 2**21 makes every product < 2**42, so the share computation is one float64 matrix
product (exact while a sum has at most 2**11 terms) instead of a Python loop over big integers; the
O(n * t) evaluation of a client's shares in a complete graph of 1,000 clients takes milliseconds.

A reconstruction from fewer than t shares, or from a corrupted share, silently gives a wrong value:
``combine`` keeps the low 16 bits of each interpolated word, so every result decodes to *some* byte
string, and it is the caller's job to verify the result (secure aggregation checks a hash commitment
or an X25519 public key).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import numpy as np

PRIME = (1 << 21) - 9  # 2,097,143 (prime); the largest prime below 2**21
WORD_BYTES = 2  # secret bytes per field element
SHARE_WORD_BYTES = 4  # bytes per share word (uint32)
_BLOCK = 1 << 11  # max terms per float64 partial sum: (q-1)**2 * 2**11 < 2**53, so sums stay exact


def _uniform(count: int) -> np.ndarray:
    """``count`` uniform field elements from the OS CSPRNG, by rejection (no modulo bias)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        need = count - out.size + 8
        raw = np.frombuffer(os.urandom(4 * need), dtype="<u4") & np.uint32((1 << 21) - 1)
        out = np.concatenate([out, raw[raw < PRIME].astype(np.int64)])
    return out[:count]


@functools.lru_cache(maxsize=8)
def _vandermonde(n: int, t: int) -> np.ndarray:
    """V[x-1, k] = x**k mod q for x = 1..n, k < t, as float64 (cached: every client of a round shares it)."""
    x = np.arange(1, n + 1, dtype=np.int64)
    v = np.empty((n, t), dtype=np.int64)
    v[:, 0] = 1
    for k in range(1, t):
        v[:, k] = v[:, k - 1] * x % PRIME
    out = v.astype(np.float64)
    out.setflags(write=False)
    return out


def _matmul_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a @ b) mod q for float64 matrices of field elements, exact (blocks of at most 2**11 terms)."""
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.int64)
    for k in range(0, a.shape[1], _BLOCK):
        part = a[:, k : k + _BLOCK] @ b[k : k + _BLOCK]
        out = (out + part.astype(np.int64)) % PRIME
    return out


def _secret_words(secret: bytes) -> np.ndarray:
    if not isinstance(secret, (bytes, bytearray)) or not secret or len(secret) % WORD_BYTES:
        raise ValueError(f"secret must be a non-empty byte string of even length, got {len(secret)} bytes")
    return np.frombuffer(bytes(secret), dtype="<u2").astype(np.float64)


def split(secret: bytes, t: int, n: int) -> list[bytes]:
    """Split ``secret`` into ``n`` shares (for x = 1..n) any ``t`` of which reconstruct it.

    Each share is ``2 * len(secret)`` bytes. ``t == 1`` gives every holder the secret itself.
    """
    if not 1 <= t <= n < PRIME:
        raise ValueError(f"need 1 <= t <= n < {PRIME}, got t={t}, n={n}")
    words = _secret_words(secret)
    coeffs = np.empty((t, words.size), dtype=np.float64)
    coeffs[0] = words
    coeffs[1:] = _uniform((t - 1) * words.size).reshape(t - 1, words.size)
    shares = _matmul_mod(_vandermonde(n, t), coeffs)
    return [row.astype("<u4").tobytes() for row in shares]


def check_share(share: bytes, secret_bytes: int) -> None:
    """Raise ValueError unless ``share`` is a well-formed share of a ``secret_bytes``-byte secret."""
    if not isinstance(share, (bytes, bytearray)) or len(share) != 2 * secret_bytes:
        raise ValueError(f"a share of a {secret_bytes}-byte secret has {2 * secret_bytes} bytes")
    if (np.frombuffer(bytes(share), dtype="<u4") >= PRIME).any():
        raise ValueError(f"share word out of range (>= {PRIME})")


def _points(shares: Mapping[int, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation points and share words of a {x: share} mapping, validated."""
    if not shares:
        raise ValueError("no shares given")
    xs = np.array(sorted(shares), dtype=np.int64)
    if xs[0] < 1 or xs[-1] >= PRIME:
        raise ValueError(f"share points must lie in 1..{PRIME - 1}")
    sizes = {len(shares[int(x)]) for x in xs}
    if len(sizes) != 1 or sizes.pop() % SHARE_WORD_BYTES:
        raise ValueError("shares differ in length or are not whole uint32 words")
    ys = np.stack([np.frombuffer(bytes(shares[int(x)]), dtype="<u4") for x in xs]).astype(np.int64)
    if (ys >= PRIME).any():
        raise ValueError(f"share word out of range (>= {PRIME})")
    return xs, ys


def _prod_mod(m: np.ndarray) -> np.ndarray:
    """Row products mod q of an int64 matrix of field elements, by pairwise halving (log2(columns) passes)."""
    while m.shape[1] > 1:
        if m.shape[1] % 2:
            m = np.concatenate([m, np.ones((m.shape[0], 1), dtype=np.int64)], axis=1)
        m = m[:, 0::2] * m[:, 1::2] % PRIME
    return m[:, 0]


def _lagrange(xs: np.ndarray, at: int) -> np.ndarray:
    """Lagrange weights l_i(at) = prod_{j != i} (at - x_j) / (x_i - x_j) mod q."""
    diag = np.eye(xs.size, dtype=bool)
    num = np.where(diag, 1, np.broadcast_to((at - xs[None, :]) % PRIME, diag.shape))
    den = np.where(diag, 1, (xs[:, None] - xs[None, :]) % PRIME)
    inv = np.array([pow(int(d), PRIME - 2, PRIME) for d in _prod_mod(den)], dtype=np.int64)  # Fermat inverse
    return _prod_mod(num) * inv % PRIME


def interpolate(shares: Mapping[int, bytes], at: int) -> bytes:
    """The share at point ``at`` of the polynomial through ``shares`` ({x: share}), in share format.

    Used to find which received shares disagree with a verified reconstruction.
    """
    xs, ys = _points(shares)
    weights = _lagrange(xs, at % PRIME).astype(np.float64)[None, :]
    return _matmul_mod(weights, ys.astype(np.float64))[0].astype("<u4").tobytes()


def combine(shares: Mapping[int, bytes]) -> bytes:
    """Reconstruct the secret from ``shares`` ({x: share}); every given share is used.

    With fewer than t shares, or a corrupted one, the result is a wrong secret of the right length
    (not an error): verify it against a commitment.
    """
    words = np.frombuffer(interpolate(shares, 0), dtype="<u4")
    return (words & np.uint32(0xFFFF)).astype("<u2").tobytes()
