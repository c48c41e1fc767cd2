"""Secure aggregation: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020) over Z_p, p = 2**61 - 1.

The server learns the sum of the surviving clients' vectors and nothing else about any one of them
(against an honest-but-curious server and clients that follow the protocol; see "Limits" below).

One round, every message a ``bytes`` object (``to_bytes`` / ``from_bytes`` below; no pickle):

1. AdvertiseKeys   client -> server: two X25519 public keys, c (encrypts shares) and s (pairwise masks).
2. ShareKeys       server -> client: its neighbours' public keys (a roster); client -> server: a SHA-256
                   commitment to a fresh self-mask seed b_i and, for every neighbour j, an AEAD
                   ciphertext (key HKDF(X25519(c_i, c_j))) of j's Shamir shares of b_i and of s_i's
                   private key; server -> client: the ciphertexts addressed to it (an inbox).
3. MaskedInput     client -> server: y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod p,
                   j over the neighbours that sent shares, s_ij = HKDF(X25519(s_i, s_j)) = s_ji.
4. Unmasking       server -> survivor: which of its neighbours survived / dropped; survivor -> server: its
                   shares of b_j (survivors) or of s_j's private key (dropped), never both for one j.
                   The server rebuilds b_j and the dropped clients' keys, verifies them against the
                   commitment / the advertised public key, removes every mask and outputs sum_i x_i mod p.

Neighbours: a complete graph (SecAgg: O(n^2) key agreements and PRG expansions per round) or a
Harary graph of degree ~k over a seeded random permutation of the clients (SecAgg+: O(n k), k = O(log n)).

Everything cryptographic comes from ``cryptography``: X25519, HKDF-SHA256, ChaCha20-Poly1305 (shares),
ChaCha20 keystream (mask PRG); randomness from ``os.urandom``. Shamir sharing is in ``shamir.py``.

Limits (honest-but-curious server): there are no signatures and no consistency-check round
(Bonawitz et al.'s actively secure variant), so a *malicious* server that tells some clients that j
dropped and others that j survived could collect both of j's secrets; clients refuse a request that
asks for both shares of one neighbour and answer only one request per session, which stops a single
inconsistent request but not inconsistent views across clients. The server authenticates clients by
the transport (``cid`` arguments), not cryptographically.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfm.errors import FedFMError
from fedfm.privacy import shamir

__all__ = [
    "Advert",
    "Inbox",
    "MaskedInput",
    "P",
    "Roster",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "ShareMessage",
    "SimStats",
    "UnmaskRequest",
    "UnmaskResponse",
    "commitment",
    "decode_fixed",
    "encode_fixed",
    "field_add",
    "field_sub",
    "neighbour_graph",
    "prg",
    "secagg_plus_neighbours",
    "simulate",
    "threshold_count",
]

P = (1 << 61) - 1  # the field Z_p of masked vectors; a Mersenne prime
_P = np.uint64(P)
SEED_BYTES = 32  # self-mask seed b_i, pairwise seeds, X25519 keys
SECRET_BYTES = 2 * SEED_BYTES  # b_i || s_i private key, shared together (each word is an independent Shamir instance)
SHARE_BYTES = 2 * SECRET_BYTES  # a share of the pair (shamir: 4 bytes per 2 secret bytes)
HALF_SHARE = SHARE_BYTES // 2  # first half: share of b_i; second half: share of s_i's private key
_NONCE = 12
CIPHERTEXT_BYTES = _NONCE + SHARE_BYTES + 16  # nonce || ChaCha20-Poly1305(share) || tag
MAX_RECOVERY_ATTEMPTS = 64  # t-subsets of the received shares tried before giving up on a secret
_PRG_NONCE = bytes(16)  # every PRG seed is used for one expansion only, so a fixed nonce is safe


class SecAggError(FedFMError):
    """The secure-aggregation round cannot complete correctly (it aborts instead of returning a wrong sum)."""


@dataclass(frozen=True)
class SecAggParams:
    """Protocol parameters shared by the server and every client of a round."""

    frac_bits: int = 24
    neighbours: int | None = None  # None = complete graph (SecAgg); k = SecAgg+ sparse graph of degree ~k
    threshold: float = 0.5  # t = floor(threshold * degree) + 1, clipped to [1, degree]
    min_survivors: int = 1  # fewer surviving clients -> SecAggError

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 60:
            raise ValueError(f"frac_bits must be in [0, 60], got {self.frac_bits}")
        if self.neighbours is not None and self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or None, got {self.neighbours}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.min_survivors < 1:
            raise ValueError(f"min_survivors must be >= 1, got {self.min_survivors}")


# --- field Z_p and fixed point --------------------------------------------------------------------
def _reduce(a: np.ndarray) -> None:
    """In place: a mod p for 0 <= a < 2p (a - p wraps around to a huge value when a < p)."""
    np.minimum(a, a - _P, out=a)


def _iadd(acc: np.ndarray, v: np.ndarray) -> None:
    acc += v  # both < p < 2**61: no uint64 overflow
    _reduce(acc)


def _isub(acc: np.ndarray, v: np.ndarray) -> None:
    acc += _P
    acc -= v  # acc + p - v lies in (0, 2p)
    _reduce(acc)


def field_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod p for uint64 field vectors."""
    out = np.array(a, dtype=np.uint64, copy=True)
    _iadd(out, np.asarray(b, dtype=np.uint64))
    return out


def field_sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) mod p for uint64 field vectors."""
    out = np.array(a, dtype=np.uint64, copy=True)
    _isub(out, np.asarray(b, dtype=np.uint64))
    return out


def encode_fixed(x: np.ndarray, frac_bits: int, n_participants: int, rng: np.random.Generator) -> np.ndarray:
    """Floats -> Z_p: q = x * 2**frac_bits stochastically rounded (unbiased), negatives as p - |q|.

    Raises ValueError if some |q| exceeds (p // 2) // n_participants: above it the sum of
    n_participants such values could wrap around and decode to a wrong sign.
    """
    if n_participants < 1:
        raise ValueError(f"n_participants must be >= 1, got {n_participants}")
    scaled = np.asarray(x, dtype=np.float64) * 2.0**frac_bits
    if not np.isfinite(scaled).all():
        raise ValueError("cannot encode NaN or infinite values")
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < scaled - low)  # round up with probability = fractional part
    bound = (P // 2) // n_participants
    worst = float(np.abs(q).max(initial=0.0))
    if worst > bound:
        raise ValueError(
            f"fixed-point value {worst:.4g} = |x| * 2**{frac_bits} exceeds the bound (p // 2) // n_participants"
            f" = {bound} (n_participants={n_participants}); lower frac_bits or clip the inputs"
        )
    qi = q.astype(np.int64)
    return np.where(qi < 0, _P - np.abs(qi).astype(np.uint64), qi.astype(np.uint64)).astype(np.uint64)


def decode_fixed(s: np.ndarray, frac_bits: int) -> np.ndarray:
    """Z_p -> floats: values above p // 2 are negative (p - v -> -v), then divided by 2**frac_bits."""
    s = np.asarray(s, dtype=np.uint64)
    if (s >= _P).any():
        raise ValueError("field values must be < p = 2**61 - 1")
    neg = s > _P // np.uint64(2)
    signed = np.where(neg, -((_P - s).astype(np.int64)), s.astype(np.int64))
    return signed.astype(np.float64) / 2.0**frac_bits


def prg(seed: bytes, length: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` elements of Z_p (ChaCha20 keystream, 8 bytes per element).

    Each 64-bit word is shifted right by 3 (uniform on [0, 2**61)) and the one value 2**61 - 1 = p is
    folded to 0, so 0 has probability 2 * 2**-61 and every other value 2**-61: a statistical distance
    of 2**-61 per element from uniform, negligible.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    enc = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor()
    out = np.frombuffer(enc.update(bytes(8 * length)), dtype="<u8") >> np.uint64(3)
    _reduce(out)
    return out


# --- key agreement and derivations ------------------------------------------------------------------
def _agree(sk: X25519PrivateKey, pk: bytes) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as exc:  # malformed or low-order public key
        raise SecAggError(f"invalid X25519 public key: {exc}") from None


def _kdf(shared: bytes, session: bytes, label: bytes, a: int, b: int) -> bytes:
    """HKDF-SHA256 of an X25519 secret, bound to the session, a purpose and the (unordered) pair of ids."""
    lo, hi = sorted((a, b))
    info = b"fedfm-secagg/" + label + struct.pack("<II", lo, hi)
    return HKDF(hashes.SHA256(), SEED_BYTES, salt=session, info=info).derive(shared)


def _pair_seed(sk: X25519PrivateKey, pk: bytes, session: bytes, a: int, b: int) -> bytes:
    """s_ab = s_ba: the seed of the pairwise mask between clients a and b."""
    return _kdf(_agree(sk, pk), session, b"pairwise-mask", a, b)


def _share_ad(session: bytes, sender: int, recipient: int) -> bytes:
    """AEAD associated data of a share ciphertext: it only decrypts for this session, sender and recipient."""
    return b"fedfm-secagg/share" + struct.pack("<II", sender, recipient) + session


def commitment(session: bytes, client_id: int, b: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (hiding: b is 32 random bytes; binding: collision resistance)."""
    return hashlib.sha256(b"fedfm-secagg/commit" + struct.pack("<II", len(session), client_id) + session + b).digest()


def _public(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


# --- neighbour graph and thresholds -----------------------------------------------------------------
def neighbour_graph(ids: list[int], k: int | None, seed: bytes) -> dict[int, list[int]]:
    """Who shares keys and masks with whom: {id: sorted neighbour ids}, symmetric, no self-loops.

    k=None (or k >= n-1): the complete graph (SecAgg). Otherwise the Harary graph H(k, n) over a
    permutation of ``ids`` drawn from ``seed`` (SecAgg+): each node is joined to the k//2 nodes on either
    side in the permuted ring and, for odd k, to the opposite node, so degrees are k (one node k+1
    when k and n are both odd) and the graph is k-connected. Deterministic in (ids, k, seed).
    """
    members = sorted(ids)
    if len(set(members)) != len(members):
        raise ValueError("client ids must be distinct")
    n = len(members)
    if k is None or k >= n - 1:
        return {i: [j for j in members if j != i] for i in members}
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    digest = hashlib.sha256(b"fedfm-secagg/graph" + seed).digest()
    rng = np.random.default_rng(np.frombuffer(digest, dtype="<u4"))
    ring = [members[p] for p in rng.permutation(n)]
    adj: dict[int, set[int]] = {i: set() for i in members}
    pairs = [(p, p + d) for p in range(n) for d in range(1, k // 2 + 1)]
    if k % 2:
        pairs += [(p, p + (n + 1) // 2) for p in range((n + 1) // 2)]
    for p, q in pairs:
        a, b = ring[p], ring[q % n]
        adj[a].add(b)
        adj[b].add(a)
    return {i: sorted(adj[i]) for i in members}


def threshold_count(degree: int, fraction: float) -> int:
    """Shares needed to rebuild a secret shared among ``degree`` neighbours: floor(fraction*degree)+1 in [1, degree]."""
    return max(1, min(degree, math.floor(fraction * degree) + 1))


def _binom_cdf(m: int, k: int, p: float) -> float:
    return sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(m + 1))


def secagg_plus_neighbours(n: int, dropout: float = 0.0, threshold: float = 0.5, fail_log2: int = 20) -> int:
    """A SecAgg+ degree k for n clients: the smallest even k >= 2*ceil(log2 n) that tolerates ``dropout``.

    Our rule, not the paper's full parameter selection (Bell et al. also account for corrupt clients):
    k starts at 2*ceil(log2 n) (k = O(log n)) and grows until the union bound n * P[a client keeps fewer
    than t of its k neighbours], neighbours dropping independently with probability ``dropout``,
    is at most 2**-fail_log2. Capped at n-1 (the complete graph).
    """
    k = max(2, 2 * math.ceil(math.log2(max(n, 2))))
    while k < n - 1:
        t = threshold_count(k, threshold)
        if n * _binom_cdf(t - 1, k, 1 - dropout) <= 2.0**-fail_log2:
            return k
        k += 2
    return n - 1


# --- wire format ----------------------------------------------------------------------------------------
_MAGIC = b"FSA1"
_ADVERT, _ROSTER, _SHARES, _INBOX, _MASKED, _UNMASK_REQUEST, _UNMASK = range(1, 8)


class _Writer:
    """Builds MAGIC | kind | session (u32-length-prefixed) | client id (u32) | fields."""

    def __init__(self, kind: int, session: bytes, client_id: int) -> None:
        self._parts = [_MAGIC, bytes([kind])]
        self.blob(session)
        self.u32(client_id)

    def u32(self, v: int) -> None:
        if not 0 <= v < 2**32:
            raise ValueError(f"{v} does not fit in a uint32")
        self._parts.append(struct.pack("<I", v))

    def raw(self, b: bytes) -> None:
        self._parts.append(bytes(b))

    def blob(self, b: bytes) -> None:
        self.u32(len(b))
        self.raw(b)

    def ids(self, ids: tuple[int, ...]) -> None:
        self.u32(len(ids))
        for i in ids:
            self.u32(i)

    def pairs(self, items: tuple[tuple[int, bytes], ...]) -> None:
        self.u32(len(items))
        for i, b in items:
            self.u32(i)
            self.blob(b)

    def done(self) -> bytes:
        return b"".join(self._parts)


class _Reader:
    """Parses what ``_Writer`` built; every inconsistency is a ValueError naming the message kind."""

    def __init__(self, data: bytes, kind: int, name: str) -> None:
        self._name = name
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # ValueError, not TypeError: callers treat every undecodable message alike
            raise ValueError(f"malformed {name} message: expected bytes, got {type(data).__name__}")  # noqa: TRY004
        self._d, self._at = bytes(data), 0
        if self.raw(len(_MAGIC)) != _MAGIC:
            self.fail("not a fedfm SecAgg message (bad magic)")
        got = self.raw(1)[0]
        if got != kind:
            self.fail(f"message kind {got}, expected {kind}")
        self.session, self.client_id = self.blob(), self.u32()

    def fail(self, why: str) -> None:
        raise ValueError(f"malformed {self._name} message: {why}")

    def raw(self, n: int) -> bytes:
        if n < 0 or self._at + n > len(self._d):
            self.fail(f"truncated (wanted {n} bytes at offset {self._at} of {len(self._d)})")
        out = self._d[self._at : self._at + n]
        self._at += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.raw(4))[0]

    def blob(self) -> bytes:
        return self.raw(self.u32())

    def count(self, min_item_bytes: int) -> int:
        n = self.u32()
        if n * min_item_bytes > len(self._d) - self._at:
            self.fail(f"declares {n} items, more than the remaining bytes can hold")
        return n

    def ids(self) -> tuple[int, ...]:
        return tuple(self.u32() for _ in range(self.count(4)))

    def pairs(self) -> tuple[tuple[int, bytes], ...]:
        return tuple((self.u32(), self.blob()) for _ in range(self.count(8)))

    def end(self) -> None:
        if self._at != len(self._d):
            self.fail(f"{len(self._d) - self._at} trailing bytes")


@dataclass(frozen=True)
class Advert:
    """Stage 1, client -> server: the client's two X25519 public keys (c: share encryption, s: masks)."""

    session: bytes
    client_id: int
    c_pk: bytes
    s_pk: bytes

    def to_bytes(self) -> bytes:
        w = _Writer(_ADVERT, self.session, self.client_id)
        w.raw(_fixed(self.c_pk, SEED_BYTES, "c_pk"))
        w.raw(_fixed(self.s_pk, SEED_BYTES, "s_pk"))
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> Advert:
        r = _Reader(data, _ADVERT, "advert")
        out = cls(r.session, r.client_id, r.raw(SEED_BYTES), r.raw(SEED_BYTES))
        r.end()
        return out


@dataclass(frozen=True)
class Roster:
    """Stage 2, server -> client ``client_id``: (id, c_pk, s_pk) of each neighbour that advertised keys."""

    session: bytes
    client_id: int
    neighbours: tuple[tuple[int, bytes, bytes], ...]

    def to_bytes(self) -> bytes:
        w = _Writer(_ROSTER, self.session, self.client_id)
        w.u32(len(self.neighbours))
        for j, c_pk, s_pk in self.neighbours:
            w.u32(j)
            w.raw(_fixed(c_pk, SEED_BYTES, "c_pk"))
            w.raw(_fixed(s_pk, SEED_BYTES, "s_pk"))
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> Roster:
        r = _Reader(data, _ROSTER, "roster")
        n = r.count(4 + 2 * SEED_BYTES)
        out = cls(r.session, r.client_id, tuple((r.u32(), r.raw(SEED_BYTES), r.raw(SEED_BYTES)) for _ in range(n)))
        r.end()
        return out


@dataclass(frozen=True)
class ShareMessage:
    """Stage 2, client -> server: commitment to b_i and one encrypted share pair per neighbour (recipient, ct)."""

    session: bytes
    client_id: int
    commitment: bytes
    ciphertexts: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        w = _Writer(_SHARES, self.session, self.client_id)
        w.raw(_fixed(self.commitment, 32, "commitment"))
        w.pairs(self.ciphertexts)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareMessage:
        r = _Reader(data, _SHARES, "share-keys")
        out = cls(r.session, r.client_id, r.raw(32), r.pairs())
        r.end()
        return out


@dataclass(frozen=True)
class Inbox:
    """Stage 2, server -> client ``client_id``: the share ciphertexts addressed to it, as (sender, ct)."""

    session: bytes
    client_id: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        w = _Writer(_INBOX, self.session, self.client_id)
        w.pairs(self.ciphertexts)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> Inbox:
        r = _Reader(data, _INBOX, "inbox")
        out = cls(r.session, r.client_id, r.pairs())
        r.end()
        return out


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3, client -> server: the masked vector as raw bytes plus a dtype tag ('<u8' = little-endian uint64).

    The tag is only compared with '<u8', never handed to numpy (the bytes are untrusted).
    """

    session: bytes
    client_id: int
    dtype: str
    data: bytes

    @classmethod
    def from_array(cls, session: bytes, client_id: int, y: np.ndarray) -> MaskedInput:
        return cls(session, client_id, "<u8", np.ascontiguousarray(y, dtype="<u8").tobytes())

    def to_bytes(self) -> bytes:
        w = _Writer(_MASKED, self.session, self.client_id)
        w.blob(self.dtype.encode("ascii"))
        w.blob(self.data)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        r = _Reader(data, _MASKED, "masked-input")
        tag = r.blob()
        if len(tag) > 16 or not tag.isascii():
            r.fail("dtype tag must be at most 16 ASCII bytes")
        out = cls(r.session, r.client_id, tag.decode("ascii"), r.blob())
        r.end()
        return out


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, server -> survivor ``client_id``: which of its neighbours survived and which dropped."""

    session: bytes
    client_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(_UNMASK_REQUEST, self.session, self.client_id)
        w.ids(self.survivors)
        w.ids(self.dropped)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = _Reader(data, _UNMASK_REQUEST, "unmask-request")
        out = cls(r.session, r.client_id, r.ids(), r.ids())
        r.end()
        return out


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, survivor -> server: shares of b_j for surviving neighbours, of s_j's key for dropped ones."""

    session: bytes
    client_id: int
    b_shares: tuple[tuple[int, bytes], ...]
    s_shares: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        w = _Writer(_UNMASK, self.session, self.client_id)
        w.pairs(self.b_shares)
        w.pairs(self.s_shares)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = _Reader(data, _UNMASK, "unmask-response")
        out = cls(r.session, r.client_id, r.pairs(), r.pairs())
        r.end()
        return out


def _fixed(b: bytes, n: int, what: str) -> bytes:
    if len(b) != n:
        raise ValueError(f"{what} must be {n} bytes, got {len(b)}")
    return b


def _check_session(session: bytes) -> None:
    if not isinstance(session, bytes) or not 16 <= len(session) <= 64:
        raise ValueError("session must be 16 to 64 bytes (32 random or hashed bytes recommended)")


def _check_id(cid: int) -> None:
    if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or not 0 <= cid < 2**32:
        raise ValueError(f"client ids must be integers in [0, 2**32), got {cid!r}")


def _check_field_vector(x: np.ndarray, length: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint64 or x.shape != (length,):
        raise ValueError(f"expected a uint64 vector of shape ({length},)")
    if (x >= _P).any():
        raise ValueError("field vector values must be < p = 2**61 - 1 (use encode_fixed)")


# --- client ---------------------------------------------------------------------------------------------
class SecAggClient:
    """One client's side of a round: its keys, its self-mask seed and the shares it holds for neighbours.

    Methods must be called in protocol order, each once; anything unexpected (another session, a
    neighbour not in the roster, a share that fails authentication, an unsafe unmask request) raises
    SecAggError (malformed bytes: ValueError) and the client takes no further part in the round.
    """

    def __init__(self, client_id: int, session: bytes, params: SecAggParams, length: int) -> None:
        _check_id(client_id)
        _check_session(session)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.client_id, self.session, self.params, self.length = int(client_id), session, params, length
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._stage = "new"
        self._neighbours: dict[int, tuple[bytes, bytes]] = {}  # id -> (c_pk, s_pk)
        self._aead: dict[int, ChaCha20Poly1305] = {}
        self._held: dict[int, bytes] = {}  # neighbour id -> the share pair it dealt to this client
        self._b = b""
        self._t = 0

    def __getstate__(self) -> dict:
        """For a client that lives in a new process per message (a Flower ClientApp): the round's state with the
        two private keys as raw bytes; the derived ciphers are rebuilt on demand."""
        raw = dict(encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw,
                   encryption_algorithm=serialization.NoEncryption())
        state = {k: v for k, v in self.__dict__.items() if k not in ("_c_sk", "_s_sk", "_aead")}
        return {**state, "_c_sk": self._c_sk.private_bytes(**raw), "_s_sk": self._s_sk.private_bytes(**raw)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._c_sk = X25519PrivateKey.from_private_bytes(state["_c_sk"])
        self._s_sk = X25519PrivateKey.from_private_bytes(state["_s_sk"])
        self._aead = {}

    def _advance(self, expected: str, new: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"client {self.client_id}: '{new}' called in state '{self._stage}' (protocol order)")
        self._stage = new

    def _expect(self, session: bytes, recipient: int, what: str) -> None:
        if session != self.session:
            raise SecAggError(f"client {self.client_id}: {what} belongs to another session or round")
        if recipient != self.client_id:
            raise SecAggError(f"client {self.client_id}: {what} is addressed to client {recipient}")

    def advertise(self) -> bytes:
        """Stage 1: this client's two public keys."""
        self._advance("new", "advertised")
        return Advert(self.session, self.client_id, _public(self._c_sk), _public(self._s_sk)).to_bytes()

    def share_keys(self, roster: bytes) -> bytes:
        """Stage 2: commit to a fresh b_i and send each neighbour its encrypted shares of b_i and s_i."""
        self._advance("advertised", "shared")
        r = Roster.from_bytes(roster)
        self._expect(r.session, r.client_id, "roster")
        ids = [j for j, _, _ in r.neighbours]
        if not ids or len(set(ids)) != len(ids) or self.client_id in ids:
            raise SecAggError(f"client {self.client_id}: roster must list distinct neighbours other than itself")
        self._neighbours = {j: (c, s) for j, c, s in sorted(r.neighbours)}
        self._t = threshold_count(len(ids), self.params.threshold)
        self._b = os.urandom(SEED_BYTES)
        shares = shamir.split(self._b + self._s_sk.private_bytes_raw(), self._t, len(ids))
        sealed = tuple((j, self._seal(j, share)) for j, share in zip(self._neighbours, shares))  # x = position + 1
        commit = commitment(self.session, self.client_id, self._b)
        return ShareMessage(self.session, self.client_id, commit, sealed).to_bytes()

    def _cipher(self, j: int) -> ChaCha20Poly1305:
        """The AEAD shared with neighbour j (symmetric key: the same for both directions)."""
        if j not in self._aead:
            shared = _agree(self._c_sk, self._neighbours[j][0])
            self._aead[j] = ChaCha20Poly1305(_kdf(shared, self.session, b"share-encryption", self.client_id, j))
        return self._aead[j]

    def _seal(self, j: int, share: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._cipher(j).encrypt(nonce, share, _share_ad(self.session, self.client_id, j))

    def receive_shares(self, inbox: bytes) -> None:
        """Stage 2: decrypt and keep the shares neighbours dealt to this client."""
        self._advance("shared", "holding")
        box = Inbox.from_bytes(inbox)
        self._expect(box.session, box.client_id, "inbox")
        senders = [j for j, _ in box.ciphertexts]
        if len(set(senders)) != len(senders) or not set(senders) <= set(self._neighbours):
            raise SecAggError(f"client {self.client_id}: inbox has duplicate senders or senders outside the roster")
        for j, ct in box.ciphertexts:
            try:
                share = self._cipher(j).decrypt(ct[:_NONCE], ct[_NONCE:], _share_ad(self.session, j, self.client_id))
            except (InvalidTag, ValueError):
                raise SecAggError(f"client {self.client_id}: the share from client {j} failed authentication") from None
            if len(share) != SHARE_BYTES:
                raise SecAggError(f"client {self.client_id}: the share from client {j} has the wrong size")
            self._held[j] = share
        self._aead.clear()  # no further use; a complete graph of 1,000 clients would keep 10**6 of them
        if len(self._held) < self._t:
            # then this client's own secrets could never be rebuilt, and revealing b_i alone would expose x_i
            raise SecAggError(
                f"client {self.client_id}: only {len(self._held)} neighbours hold its shares, {self._t} needed"
            )

    def mask(self, x: np.ndarray) -> bytes:
        """Stage 3: y = x + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod p over share-holding neighbours."""
        self._advance("holding", "masked")
        _check_field_vector(x, self.length)
        y = x.astype(np.uint64, copy=True)
        _iadd(y, prg(self._b, self.length))
        for j in sorted(self._held):
            m = prg(_pair_seed(self._s_sk, self._neighbours[j][1], self.session, self.client_id, j), self.length)
            (_iadd if j > self.client_id else _isub)(y, m)
        return MaskedInput.from_array(self.session, self.client_id, y).to_bytes()

    def unmask(self, request: bytes) -> bytes:
        """Stage 4: shares of b_j for surviving neighbours, of s_j's key for dropped ones; refuses unsafe requests."""
        self._advance("masked", "unmasked")
        req = UnmaskRequest.from_bytes(request)
        self._expect(req.session, req.client_id, "unmask request")
        surv, drop = set(req.survivors), set(req.dropped)
        me = self.client_id
        if len(surv) != len(req.survivors) or len(drop) != len(req.dropped):
            raise SecAggError(f"client {me}: refusing an unmask request that lists a neighbour twice")
        if me in drop or me in surv:
            raise SecAggError(f"client {me}: refusing an unmask request that lists this client itself (as dropped)")
        if surv & drop:
            raise SecAggError(f"client {me}: refusing to reveal both shares of client(s) {sorted(surv & drop)}")
        if not (surv | drop) <= set(self._held):
            raise SecAggError(f"client {me}: unmask request names clients {sorted((surv | drop) - set(self._held))}"
                              " whose shares it does not hold")
        b_shares = tuple((j, self._held[j][:HALF_SHARE]) for j in sorted(surv))
        s_shares = tuple((j, self._held[j][HALF_SHARE:]) for j in sorted(drop))
        return UnmaskResponse(self.session, me, b_shares, s_shares).to_bytes()


# --- server ---------------------------------------------------------------------------------------------
class SecAggServer:
    """The server's side of one round. ``receive_*`` return None (accepted) or the reason for rejecting.

    A client whose message is rejected takes no further part (from stage 4 on, a rejected unmask
    response is only ignored: the client's input is already in the sum). ``survivors`` are the clients
    whose input the current stage still includes (after stage 3: exactly those in ``result()``),
    ``dropped`` the other ``client_ids``, ``rejected`` the first reason recorded per client, and
    ``excluded_shares`` the holders whose shares disagreed with a verified reconstruction.
    ``seen_digests`` (SHA-256 of accepted masked vectors) should be one set shared by all rounds so a
    vector replayed from an earlier round is refused.
    """

    def __init__(self, session: bytes, params: SecAggParams, client_ids: list[int], length: int,
                 graph_seed: bytes, seen_digests: set[bytes] | None = None, spool=None) -> None:
        _check_session(session)
        for cid in client_ids:
            _check_id(cid)
        if len(set(client_ids)) != len(client_ids) or length < 1:
            raise ValueError("client ids must be distinct and length >= 1")
        self.session, self.params, self.length, self._graph_seed = session, params, length, graph_seed
        self._ids = frozenset(int(c) for c in client_ids)
        self._seen = seen_digests if seen_digests is not None else set()
        self._stage = 1
        self._probe = X25519PrivateKey.generate()  # only to test advertised public keys
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # U1: id -> (c_pk, s_pk)
        self._used_keys: set[bytes] = set()
        self._point: dict[int, dict[int, int]] = {}  # dealer -> holder -> share point x (roster index + 1)
        self._roster: dict[int, list[int]] = {}  # id -> sorted neighbours sent in its roster (share point = index+1)
        self._t: dict[int, int] = {}
        self._commit: dict[int, bytes] = {}
        self._outgoing: dict[int, dict[int, bytes]] = {}  # U2 candidates: sender -> recipient -> ciphertext
        self._holders: dict[int, list[int]] = {}  # U2: id -> neighbours in U2 (hold its shares, masked with it)
        self._spoken: set[int] = set()  # clients that sent something in the current stage
        self._masked: dict[int, np.ndarray | str] = {}  # U3: the vector, or its key in the spool
        self._spool = spool  # a fedfm.store.UpdateSpool: masked vectors within a memory budget, the rest on disk
        self._requested: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._shares: dict[str, dict[int, dict[int, bytes]]] = {"b": {}, "s": {}}  # kind -> owner -> {x: share}
        self._result: np.ndarray | None = None
        self.survivors: list[int] = sorted(self._ids)
        self.dropped: list[int] = []
        self.rejected: dict[int, str] = {}
        self.excluded_shares: dict[int, list[int]] = {}

    # -- bookkeeping --
    def _reject(self, cid: int, reason: str) -> str:
        self.rejected.setdefault(cid, reason)
        return reason

    def _set_members(self, members: set[int] | list[int]) -> None:
        self.survivors = sorted(members)
        self.dropped = sorted(self._ids - set(members))

    def _close(self, stage: int) -> None:
        if self._stage != stage:
            raise SecAggError(f"server: stage {stage} is not the current stage ({self._stage}); call in protocol order")
        self._stage, self._spoken = stage + 1, set()

    def _gate(self, cid: int, stage: int, what: str, members: Mapping | frozenset) -> str | None:
        """Common checks before parsing: right stage, known participant, first message of this stage."""
        if self._stage != stage:
            return self._reject(cid, f"{what} arrived outside its stage (server is at stage {self._stage})")
        if cid not in members:
            known = cid in self._ids
            return self._reject(cid, f"{what} from {'a client not in this stage' if known else 'an unknown client'}")
        if cid in self._spoken:
            return f"duplicate {what}"
        self._spoken.add(cid)
        return None

    def _origin(self, session: bytes, claimed: int, cid: int, what: str) -> str | None:
        if session != self.session:
            return f"{what} from another session or round"
        if claimed != cid:
            return f"{what} from client {cid} claims to be from client {claimed}"
        return None

    # -- stage 1 --
    def receive_advert(self, cid: int, msg: bytes) -> str | None:
        """Stage 1: accept a client's public keys (None) or return why not."""
        if (why := self._gate(cid, 1, "advert", self._ids)) is not None:
            if why.startswith("duplicate"):
                self._keys.pop(cid, None)
                return self._reject(cid, why + "; client dropped")
            return why
        try:
            m = Advert.from_bytes(msg)
        except ValueError as exc:
            return self._reject(cid, str(exc))
        why = self._origin(m.session, m.client_id, cid, "advert") or self._bad_keys(m.c_pk, m.s_pk)
        if why:
            return self._reject(cid, why)
        self._keys[cid] = (m.c_pk, m.s_pk)
        self._used_keys.update((m.c_pk, m.s_pk))
        return None

    def _bad_keys(self, c_pk: bytes, s_pk: bytes) -> str | None:
        if c_pk == s_pk:
            return "the two advertised public keys are equal"
        if c_pk in self._used_keys or s_pk in self._used_keys:
            return "advertised a public key already advertised by another client (replay)"
        try:
            _agree(self._probe, c_pk), _agree(self._probe, s_pk)
        except SecAggError as exc:
            return str(exc)
        return None

    def rosters(self) -> dict[int, bytes]:
        """End of stage 1: each advertising client's roster of neighbours' public keys."""
        self._close(1)
        members = sorted(self._keys)
        if len(members) < max(2, self.params.min_survivors):
            raise SecAggError(f"only {len(members)} client(s) advertised keys; secure aggregation needs "
                              f"at least {max(2, self.params.min_survivors)}")
        graph = neighbour_graph(members, self.params.neighbours, self._graph_seed)
        out = {}
        for i in members:
            self._roster[i] = graph[i]
            self._point[i] = {j: x for x, j in enumerate(graph[i], start=1)}
            self._t[i] = threshold_count(len(graph[i]), self.params.threshold)
            out[i] = Roster(self.session, i, tuple((j, *self._keys[j]) for j in graph[i])).to_bytes()
        self._set_members(members)
        return out

    # -- stage 2 --
    def receive_shares(self, cid: int, msg: bytes) -> str | None:
        """Stage 2: accept a client's commitment and encrypted shares (None) or return why not."""
        if (why := self._gate(cid, 2, "share-keys message", self._roster)) is not None:
            if why.startswith("duplicate"):
                self._outgoing.pop(cid, None)
                return self._reject(cid, why + "; client dropped")
            return why
        try:
            m = ShareMessage.from_bytes(msg)
        except ValueError as exc:
            return self._reject(cid, str(exc))
        if why := self._origin(m.session, m.client_id, cid, "share-keys message"):
            return self._reject(cid, why)
        recipients = [j for j, _ in m.ciphertexts]
        if len(set(recipients)) != len(recipients) or set(recipients) != set(self._roster[cid]):
            return self._reject(cid, "its shares are not addressed to exactly the neighbours in its roster")
        if any(len(ct) != CIPHERTEXT_BYTES for _, ct in m.ciphertexts):
            return self._reject(cid, f"a share ciphertext is not {CIPHERTEXT_BYTES} bytes")
        self._commit[cid] = m.commitment
        self._outgoing[cid] = dict(m.ciphertexts)
        return None

    def inboxes(self) -> dict[int, bytes]:
        """End of stage 2: route the ciphertexts. Clients whose shares too few neighbours hold are dropped first."""
        self._close(2)
        u2 = set(self._outgoing)
        changed = True
        while changed:  # dropping one client can leave a neighbour below its threshold: repeat until stable
            changed = False
            for i in sorted(u2):
                held = sum(j in u2 for j in self._roster[i])
                if held < self._t[i]:
                    u2.discard(i)
                    changed = True
                    self._reject(i, f"dropped before masking: only {held} of its neighbours sent shares, "
                                    f"{self._t[i]} needed to protect its input")
        if len(u2) < max(2, self.params.min_survivors):
            raise SecAggError(f"only {len(u2)} client(s) completed the key exchange")
        self._holders = {i: [j for j in self._roster[i] if j in u2] for i in sorted(u2)}
        self._set_members(u2)
        return {i: Inbox(self.session, i, tuple((j, self._outgoing[j][i]) for j in h)).to_bytes()
                for i, h in self._holders.items()}

    # -- stage 3 --
    def receive_masked(self, cid: int, msg: bytes) -> str | None:
        """Stage 3: accept a masked vector (None) or return why it was rejected (the client is then dropped)."""
        if (why := self._gate(cid, 3, "masked input", self._holders)) is not None:
            if why.startswith("duplicate") and self._masked.pop(cid, None) is not None:
                why += "; the earlier vector is discarded and the client dropped"
            return self._reject(cid, why)
        try:
            m = MaskedInput.from_bytes(msg)
        except ValueError as exc:
            return self._reject(cid, str(exc))
        why = self._origin(m.session, m.client_id, cid, "masked input") or self._bad_vector(m)
        if why:
            return self._reject(cid, why)
        digest = hashlib.sha256(m.data).digest()
        if digest in self._seen:
            return self._reject(cid, "replayed vector: identical to a masked vector received earlier")
        self._seen.add(digest)
        vector = np.frombuffer(m.data, dtype="<u8")
        if self._spool is None:
            self._masked[cid] = vector
        else:  # kept as int64 bits (safetensors has no uint64 for torch), read back bit for bit
            key = f"{cid}.{len(self._spool)}"
            self._spool.put(key, {"v": torch.from_numpy(vector.view(np.int64).copy())})
            self._masked[cid] = key
        return None

    def _vector(self, cid: int) -> np.ndarray:
        v = self._masked[cid]
        return v if isinstance(v, np.ndarray) else self._spool.tensor(v, "v").numpy().view(np.uint64)

    def close(self) -> None:
        """Let the round's masked vectors go (the spool's files are deleted)."""
        self._masked.clear()
        if self._spool is not None:
            self._spool.close()

    def _bad_vector(self, m: MaskedInput) -> str | None:
        if m.dtype != "<u8":
            return f"wrong dtype {m.dtype!r}: masked vectors are little-endian uint64 ('<u8')"
        if len(m.data) != 8 * self.length:
            return f"wrong length: {len(m.data) / 8:g} elements, expected {self.length}"
        v = np.frombuffer(m.data, dtype="<u8")
        if (bad := np.flatnonzero(v >= _P)).size:
            return f"value out of range: element {bad[0]} is {v[bad[0]]} >= p = 2**61 - 1"
        return None

    def unmask_requests(self) -> dict[int, bytes]:
        """End of stage 3: ask every survivor for the shares that remove the masks."""
        self._close(3)
        survivors = set(self._masked)
        if len(survivors) < self.params.min_survivors:
            raise SecAggError(f"only {len(survivors)} client(s) sent a valid masked input, "
                              f"min_survivors = {self.params.min_survivors}: round aborted")
        out = {}
        for i in sorted(survivors):
            surv = tuple(j for j in self._holders[i] if j in survivors)
            drop = tuple(j for j in self._holders[i] if j not in survivors)
            self._requested[i] = (frozenset(surv), frozenset(drop))
            out[i] = UnmaskRequest(self.session, i, surv, drop).to_bytes()
        self._set_members(survivors)
        return out

    # -- stage 4 --
    def receive_unmask(self, cid: int, msg: bytes) -> str | None:
        """Stage 4: store a survivor's shares (None) or return why its response is ignored."""
        if (why := self._gate(cid, 4, "unmask response", self._requested)) is not None:
            return self._reject(cid, why + " (ignored)")
        try:
            m = UnmaskResponse.from_bytes(msg)
        except ValueError as exc:
            return self._reject(cid, f"{exc} (ignored)")
        why = self._origin(m.session, m.client_id, cid, "unmask response") or self._bad_response(cid, m)
        if why:
            return self._reject(cid, why + " (ignored)")
        for kind, items in (("b", m.b_shares), ("s", m.s_shares)):
            for j, share in items:
                self._shares[kind].setdefault(j, {})[self._point[j][cid]] = share
        return None

    def _bad_response(self, cid: int, m: UnmaskResponse) -> str | None:
        surv, drop = self._requested[cid]
        b_ids, s_ids = [j for j, _ in m.b_shares], [j for j, _ in m.s_shares]
        if sorted(b_ids) != sorted(surv) or sorted(s_ids) != sorted(drop):
            return "the shares returned do not match the request"
        shares = [share for _, share in m.b_shares + m.s_shares]
        try:  # one check over all shares at once: a survivor of a complete graph returns n - 1 of them
            if any(len(share) != HALF_SHARE for share in shares):
                raise ValueError(f"a share of a {SEED_BYTES}-byte secret has {HALF_SHARE} bytes")
            shamir.check_share(b"".join(shares), SEED_BYTES * len(shares))
        except ValueError as exc:
            return f"malformed share: {exc}"
        return None

    def result(self) -> np.ndarray:
        """End of stage 4: sum_{survivors} x_i mod p (uint64), or SecAggError if a secret cannot be verified."""
        if self._result is not None:
            return self._result.copy()
        if self._stage != 4:
            raise SecAggError(f"server: result() needs stage 4, server is at stage {self._stage}")
        total = np.zeros(self.length, dtype=np.uint64)
        for i in self.survivors:
            _iadd(total, self._vector(i))
        for i in self.survivors:
            _isub(total, prg(self._recover(i, "b"), self.length))
        for j in sorted(set(self._holders) - set(self._masked)):
            self._remove_pair_masks(total, j)
        self._result, self._stage = total, 5
        return total.copy()

    def _remove_pair_masks(self, total: np.ndarray, j: int) -> None:
        """Cancel the masks survivors shared with dropped client j: survivor i added +PRG(s_ij) iff j > i."""
        partners = [i for i in self._holders[j] if i in self._masked]
        if not partners:
            return
        sk = X25519PrivateKey.from_private_bytes(self._recover(j, "s"))
        for i in partners:
            m = prg(_pair_seed(sk, self._keys[i][1], self.session, i, j), self.length)
            (_isub if j > i else _iadd)(total, m)

    def _verifier(self, j: int, kind: str) -> Callable[[bytes], bool]:
        if kind == "b":
            return lambda b: hmac.compare_digest(commitment(self.session, j, b), self._commit[j])
        # X25519 clamps the scalar (RFC 7748), so raw keys that differ only in clamped bits are the same
        # key: they pass this check and give the same pairwise masks, which is all the server needs.
        return lambda sk: _public(X25519PrivateKey.from_private_bytes(sk)) == self._keys[j][1]

    def _recover(self, j: int, kind: str) -> bytes:
        """Rebuild client j's b_j ("b") or s_j private key ("s") from t verified shares, trying other subsets."""
        label = "self-mask seed b" if kind == "b" else "mask private key s"
        check = "commitment" if kind == "b" else "advertised public key"
        shares = self._shares[kind].get(j, {})
        t = self._t[j]
        if len(shares) < t:
            raise SecAggError(f"cannot recover client {j}'s {label}: {len(shares)} share(s) received, {t} needed")
        verify, tried = self._verifier(j, kind), 0
        for tried, subset in enumerate(_subsets(sorted(shares), t, MAX_RECOVERY_ATTEMPTS, j), start=1):
            secret = shamir.combine({x: shares[x] for x in subset})
            if verify(secret):
                if tried > 1:
                    self._note_bad_shares(j, subset, shares)
                return secret
        raise SecAggError(f"cannot recover client {j}'s {label}: none of {tried} {t}-subsets of the "
                          f"{len(shares)} shares received matches its {check}")

    def _note_bad_shares(self, j: int, good: tuple[int, ...], shares: dict[int, bytes]) -> None:
        basis = {x: shares[x] for x in good}
        bad = [x for x in shares if x not in basis and shamir.interpolate(basis, x) != shares[x]]
        self.excluded_shares.setdefault(j, []).extend(self._roster[j][x - 1] for x in bad)


def _subsets(xs: list[int], t: int, limit: int, seed: int) -> Iterator[tuple[int, ...]]:
    """Up to ``limit`` distinct t-subsets of ``xs``: all of them if few, else the first t, every
    leave-one-out (isolates a single bad share), then random ones."""
    if math.comb(len(xs), t) <= limit:
        yield from itertools.combinations(xs, t)
        return
    rng = np.random.default_rng(seed)
    candidates = itertools.chain(
        [xs[:t]],
        ([x for x in xs if x != skip][:t] for skip in xs),
        (sorted(rng.choice(xs, size=t, replace=False).tolist()) for _ in itertools.count()),
    )
    seen: set[tuple[int, ...]] = set()
    for c in candidates:
        key = tuple(c)
        if key not in seen:
            seen.add(key)
            yield key
            if len(seen) >= limit:
                return


# --- in-process simulation ------------------------------------------------------------------------------
@dataclass
class SimStats:
    """Costs of a simulated round: per-client CPU-side wall time and message bytes, server time."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # client time summed over clients, per stage
    server_seconds: float = 0.0
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    client_errors: dict[int, str] = field(default_factory=dict)


Tamper = Callable[[str, int, bytes], "bytes | list[bytes] | None"]
_FAILED = object()  # a simulated client step that raised


def simulate(vectors: dict[int, np.ndarray], params: SecAggParams, session: bytes | None = None,
             drop_after_keys: set[int] | frozenset[int] = frozenset(), tamper: Tamper | None = None,
             graph_seed: bytes | None = None, stats: SimStats | None = None,
             seen_digests: set[bytes] | None = None) -> tuple[np.ndarray, SecAggServer]:
    """Run the four stages in-process, every message passing as bytes; returns (sum mod p, server).

    ``drop_after_keys``: clients that complete the key exchange and then vanish (never mask).
    ``tamper(stage, cid, msg)``, stage in {advert, roster, shares, inbox, masked, unmask_request,
    unmask}, sees every message to or from client ``cid`` and returns the bytes to deliver instead,
    a list of messages (delivered in order) or None (the message is lost). A client that raises at
    some stage is treated as dropped from then on (``stats.client_errors``). Raises SecAggError if
    the round cannot complete.
    """
    session = session if session is not None else os.urandom(32)
    stats = stats if stats is not None else SimStats()
    ids = sorted(vectors)
    length = len(vectors[ids[0]])
    clock = time.perf_counter

    def deliver(stage: str, cid: int, msg: bytes, outgoing: bool) -> list[bytes]:
        book = stats.bytes_sent if outgoing else stats.bytes_received
        book[cid] = book.get(cid, 0) + len(msg)
        out = tamper(stage, cid, msg) if tamper else msg
        return [] if out is None else [out] if isinstance(out, bytes) else list(out)

    def server_call(fn: Callable, *args):
        t0 = clock()
        try:
            return fn(*args)
        finally:
            stats.server_seconds += clock() - t0

    def client_call(stage: str, cid: int, fn: Callable, *args):
        """Run one client step, timed; a step that raises makes the client drop out (returns _FAILED)."""
        t0 = clock()
        try:
            return fn(*args)
        except (SecAggError, ValueError) as exc:
            stats.client_errors.setdefault(cid, f"{stage}: {exc}")
            return _FAILED
        finally:
            dt = clock() - t0
            stats.client_seconds[cid] = stats.client_seconds.get(cid, 0.0) + dt
            stats.stage_seconds[stage] = stats.stage_seconds.get(stage, 0.0) + dt

    def client_to_server(stage: str, cid: int, reply: bytes | object, receive: Callable) -> None:
        if reply is not _FAILED:
            for m in deliver(stage, cid, reply, True):
                server_call(receive, cid, m)

    server = server_call(SecAggServer, session, params, ids, length,
                         graph_seed if graph_seed is not None else session, seen_digests)
    clients = {i: client_call("advert", i, SecAggClient, i, session, params, length) for i in ids}  # key generation
    for i in ids:
        if clients[i] is not _FAILED:
            client_to_server("advert", i, client_call("advert", i, clients[i].advertise), server.receive_advert)
    for i, roster in server_call(server.rosters).items():
        for m in deliver("roster", i, roster, False):
            client_to_server("shares", i, client_call("shares", i, clients[i].share_keys, m), server.receive_shares)
    holding = set()
    for i, box in server_call(server.inboxes).items():
        for m in deliver("inbox", i, box, False):
            if i not in drop_after_keys and client_call("inbox", i, clients[i].receive_shares, m) is not _FAILED:
                holding.add(i)
    for i in sorted(holding):
        client_to_server("masked", i, client_call("masked", i, clients[i].mask, vectors[i]), server.receive_masked)
    for i, req in server_call(server.unmask_requests).items():
        for m in deliver("unmask_request", i, req, False):
            client_to_server("unmask", i, client_call("unmask", i, clients[i].unmask, m), server.receive_unmask)
    return server_call(server.result), server
