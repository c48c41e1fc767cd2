"""Tests of fedfm.privacy.secagg (SecAgg / SecAgg+) and fedfm.privacy.shamir.

Where an expected number is not exact arithmetic, a comment says where it comes from. The
statistical tests use 5-sigma (or p = 1e-6) bounds, so a correct implementation fails them with
probability below about 1e-6 per assertion.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import deque

import numpy as np
import pytest

from fedfm.privacy import shamir
from fedfm.privacy.secagg import (
    Advert,
    Inbox,
    MaskedInput,
    P,
    Roster,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    ShareMessage,
    SimStats,
    UnmaskRequest,
    UnmaskResponse,
    commitment,
    decode_fixed,
    encode_fixed,
    field_add,
    field_sub,
    neighbour_graph,
    prg,
    secagg_plus_neighbours,
    simulate,
    threshold_count,
)

SESSION = bytes(range(32))
OTHER_SESSION = bytes(range(1, 33))


def field_vectors(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, P, length, dtype=np.uint64) for i in range(n)}


def plain_sum(vectors: dict[int, np.ndarray], ids) -> np.ndarray:
    total = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for i in ids:
        total = field_add(total, vectors[i])
    return total


def run_to_masked(vectors: dict[int, np.ndarray], params: SecAggParams | None = None):
    """Drive stages 1-3 by hand (no dropouts): returns clients, server and each client's masked message."""
    params = params or SecAggParams()
    length = len(vectors[0])
    clients = {i: SecAggClient(i, SESSION, params, length) for i in vectors}
    server = SecAggServer(SESSION, params, list(vectors), length, graph_seed=SESSION)
    for i, c in clients.items():
        assert server.receive_advert(i, c.advertise()) is None
    for i, roster in server.rosters().items():
        assert server.receive_shares(i, clients[i].share_keys(roster)) is None
    for i, box in server.inboxes().items():
        clients[i].receive_shares(box)
    return clients, server, {i: clients[i].mask(vectors[i]) for i in vectors}


def corrupt(share: bytes) -> bytes:
    """A well-formed but wrong share: word 5 + 12345 (mod q).

    (Not word 0: a change confined to the low 3 bits of an X25519 private key is clamped away, RFC 7748,
    so the "wrong" key is the same key and rightly passes the public-key check.)
    """
    words = np.frombuffer(share, dtype="<u4").copy()
    words[5] = (words[5] + 12345) % shamir.PRIME
    return words.astype("<u4").tobytes()


# --- field, PRG, fixed point ---------------------------------------------------------------------------
def test_prg_is_deterministic_in_range_and_seed_dependent():
    a, b = prg(b"\x01" * 32, 5000), prg(b"\x02" * 32, 5000)
    assert a.dtype == np.uint64 and a.shape == (5000,)
    assert np.array_equal(a, prg(b"\x01" * 32, 5000))
    assert (a < P).all() and not np.array_equal(a, b)
    assert np.array_equal(prg(b"\x01" * 32, 10), a[:10])  # a keystream: prefixes agree


def test_field_add_sub_wrap_around():
    a = np.array([P - 1, 0, 5], dtype=np.uint64)
    b = np.array([2, 1, 5], dtype=np.uint64)
    assert field_add(a, b).tolist() == [1, 1, 10]  # (p-1)+2 = p+1 = 1 mod p
    assert field_sub(b, a).tolist() == [3, 1, 0]  # 2-(p-1) = 3 - p = 3 mod p; 1-0; 5-5
    assert np.array_equal(field_sub(field_add(a, b), b), a)


def test_masks_cancel_exactly():
    vectors = field_vectors(6, 1000)
    clients, _, masked = run_to_masked(vectors)
    ys = {i: np.frombuffer(MaskedInput.from_bytes(m).data, dtype="<u8") for i, m in masked.items()}
    total = plain_sum(ys, ys)
    for c in clients.values():
        total = field_sub(total, prg(c._b, 1000))  # the self masks (the client's secret seed, read for the test)
    # every pairwise mask was added by one client and subtracted by the other
    assert np.array_equal(total, plain_sum(vectors, vectors))
    assert not np.array_equal(plain_sum(ys, ys), plain_sum(vectors, vectors))


def test_fixed_point_round_trip_and_sum():
    rng = np.random.default_rng(1)
    frac, n = 24, 10
    xs = [rng.normal(0, 50, 1000) for _ in range(n)]
    enc = [encode_fixed(x, frac, n, rng) for x in xs]
    assert all(e.dtype == np.uint64 and (e < P).all() for e in enc)
    # stochastic rounding moves each value by less than one unit of 2**-frac
    assert max(np.abs(decode_fixed(e, frac) - x).max() for e, x in zip(enc, xs)) <= 2.0**-frac
    total = enc[0]
    for e in enc[1:]:
        total = field_add(total, e)
    # n rounding errors of < 2**-frac each (float64 summation error ~1e-13 is far below 10 * 2**-24 = 6e-7)
    assert np.abs(decode_fixed(total, frac) - np.sum(xs, axis=0)).max() <= n * 2.0**-frac


def test_encode_fixed_refuses_values_that_could_wrap():
    rng = np.random.default_rng(0)
    x = np.array([2.0**30, -1.0])  # q = 2**54 = 1.8e16
    encode_fixed(x, 24, 10, rng)  # bound (p//2)//10 = 1.15e17: fine
    with pytest.raises(ValueError, match=r"\(p // 2\) // n_participants"):
        encode_fixed(x, 24, 100, rng)  # bound (p//2)//100 = 1.15e16 < 1.8e16
    with pytest.raises(ValueError, match="NaN"):
        encode_fixed(np.array([np.nan]), 24, 1, rng)
    assert decode_fixed(encode_fixed(np.array([-3.5]), 4, 1, rng), 4).tolist() == [-3.5]  # -56 -> p - 56 -> -56


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(2)
    frac, n = 8, 200_000
    for v in (37.3 / 256, -37.3 / 256):  # 0.3 of a unit between two grid points
        mean = decode_fixed(encode_fixed(np.full(n, v), frac, 1, rng), frac).mean()
        # each decoded draw is k/256 or (k+1)/256 with P = 0.3 / 0.7: sd = sqrt(0.21)/256 per draw
        sd_of_mean = math.sqrt(0.21) / 256 / math.sqrt(n)  # 4.0e-6
        assert abs(mean - v) < 5 * sd_of_mean
        # power check: round-to-nearest would be off by 0.3/256 = 1.2e-3, i.e. ~300 sd
        assert abs(np.round(v * 256) / 256 - v) > 100 * sd_of_mean


# --- Shamir -----------------------------------------------------------------------------------------
def test_shamir_any_t_subset_reconstructs():
    secret = os.urandom(64)
    shares = shamir.split(secret, 4, 7)
    assert len(shares) == 7 and all(len(s) == 128 for s in shares)
    for subset in itertools.combinations(range(1, 8), 4):  # all 35 subsets of exactly t shares
        assert shamir.combine({x: shares[x - 1] for x in subset}) == secret
    assert shamir.combine({x: shares[x - 1] for x in range(1, 8)}) == secret  # more than t also works
    assert shamir.combine({3: shamir.split(secret, 1, 5)[2]}) == secret  # t = 1: one share suffices
    with pytest.raises(ValueError):
        shamir.split(secret, 5, 4)


def test_below_threshold_gives_a_wrong_secret_that_the_commitment_catches():
    b = os.urandom(32)
    shares = shamir.split(b + os.urandom(32), 5, 9)
    wrong = shamir.combine({x: shares[x - 1] for x in (1, 2, 3, 4)})  # t - 1 = 4 shares
    assert len(wrong) == 64 and wrong[:32] != b  # a plausible-looking but wrong value, no error
    assert commitment(SESSION, 7, wrong[:32]) != commitment(SESSION, 7, b)
    assert shamir.combine({x: shares[x - 1] for x in (1, 2, 3, 4, 9)})[:32] == b


def test_interpolate_predicts_the_other_shares():
    shares = shamir.split(os.urandom(32), 3, 6)
    basis = {1: shares[0], 4: shares[3], 6: shares[5]}
    assert shamir.interpolate(basis, 2) == shares[1]
    assert shamir.interpolate({**basis, 1: corrupt(shares[0])}, 2) != shares[1]


# --- neighbour graph ----------------------------------------------------------------------------------
def connected(graph: dict[int, list[int]]) -> bool:
    start = next(iter(graph))
    seen, todo = {start}, deque([start])
    while todo:
        for j in graph[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == len(graph)


@pytest.mark.parametrize("n,k", [(10, 4), (31, 5), (50, 8), (101, 9), (40, 13)])
def test_sparse_graph_is_symmetric_with_degree_k(n, k):
    ids = list(range(100, 100 + n))
    g = neighbour_graph(ids, k, b"seed")
    assert sorted(g) == ids
    degrees = [len(v) for v in g.values()]
    for i, nbrs in g.items():
        assert i not in nbrs and len(set(nbrs)) == len(nbrs)
        assert all(i in g[j] for j in nbrs)  # symmetric
    # Harary H(k, n): degree k, except one node of degree k+1 when k and n are both odd
    assert min(degrees) == k and sum(d == k + 1 for d in degrees) == (k % 2) * (n % 2)
    assert max(degrees) <= k + 1 and connected(g)
    assert g == neighbour_graph(ids, k, b"seed") and g != neighbour_graph(ids, k, b"other seed")


def test_complete_graph_and_degree_choice():
    ids = [3, 1, 2, 7]
    assert neighbour_graph(ids, None, b"s") == {1: [2, 3, 7], 2: [1, 3, 7], 3: [1, 2, 7], 7: [1, 2, 3]}
    assert neighbour_graph(ids, 3, b"s") == neighbour_graph(ids, None, b"s")  # k >= n-1: complete
    assert threshold_count(19, 0.5) == 10 and threshold_count(20, 0.5) == 11 and threshold_count(1, 0.5) == 1
    # without dropouts k = 2*ceil(log2 n); with 30 % dropouts k grows until n * P[Bin(k, .7) < t] <= 2**-20
    assert secagg_plus_neighbours(1000) == 20
    assert 100 < secagg_plus_neighbours(1000, dropout=0.3) < 999


# --- whole rounds ------------------------------------------------------------------------------------
def test_complete_graph_with_30_percent_dropouts():
    vectors = field_vectors(20, 1000)
    drop = {1, 4, 7, 11, 15, 18}  # 6 of 20 drop after the key exchange
    total, server = simulate(vectors, SecAggParams(), session=SESSION, drop_after_keys=drop)
    assert server.survivors == sorted(set(vectors) - drop) and server.dropped == sorted(drop)
    assert np.array_equal(total, plain_sum(vectors, server.survivors))
    assert server.rejected == {}


def test_sparse_graph_with_30_percent_dropouts_costs_less():
    vectors = field_vectors(50, 1000, seed=3)
    drop = set(np.random.default_rng(4).choice(50, 15, replace=False).tolist())
    # k = 16 of 49 possible neighbours, t = floor(0.3 * 16) + 1 = 5: each client keeps ~11.2 of 16
    params = SecAggParams(neighbours=16, threshold=0.3)
    sparse, complete = SimStats(), SimStats()
    total, server = simulate(vectors, params, session=SESSION, drop_after_keys=drop, stats=sparse)
    assert server.survivors == sorted(set(range(50)) - drop)
    assert np.array_equal(total, plain_sum(vectors, server.survivors))
    simulate(vectors, SecAggParams(threshold=0.3), session=SESSION, drop_after_keys=drop, stats=complete)
    # roster + shares + inbox traffic scales with the degree: 16 vs 49 neighbours
    assert np.mean(list(sparse.bytes_received.values())) < 0.6 * np.mean(list(complete.bytes_received.values()))


def test_absent_silent_and_underprotected_clients():
    vectors = field_vectors(12, 1000)
    params = SecAggParams(neighbours=4, threshold=0.3)  # t = floor(0.3 * 4) + 1 = 2
    graph = neighbour_graph([i for i in range(12) if i != 3], 4, SESSION)  # built over the advertisers
    victim = 0
    silent = set(graph[victim][:3])  # three of victim's 4 neighbours never send shares -> 1 holder < t = 2

    def tamper(stage, cid, msg):
        if (stage == "advert" and cid == 3) or (stage == "shares" and cid in silent):
            return None  # message lost
        return msg

    total, server = simulate(vectors, params, session=SESSION, tamper=tamper)
    assert 3 in server.dropped and silent <= set(server.dropped) and victim in server.dropped
    assert "dropped before masking" in server.rejected[victim]
    assert np.array_equal(total, plain_sum(vectors, server.survivors)) and len(server.survivors) >= 2


def test_masked_input_validation():
    vectors = field_vectors(24, 1000)  # degree 23, t = 12: the 15 clients left still hold 14 shares each
    captured: dict[int, bytes] = {}

    def rewrap(cid, msg, **change):
        m = MaskedInput.from_bytes(msg)
        fields = {"session": m.session, "client_id": m.client_id, "dtype": m.dtype, "data": m.data, **change}
        return MaskedInput(**fields).to_bytes()

    def tamper(stage, cid, msg):
        if stage != "masked":
            return msg
        captured[cid] = msg
        data = MaskedInput.from_bytes(msg).data
        out_of_range = np.frombuffer(data, dtype="<u8").copy()
        out_of_range[17] = P
        return {
            1: msg[:-5],  # truncated
            2: rewrap(cid, msg, data=data[:-8]),  # 999 elements
            3: rewrap(cid, msg, data=out_of_range.tobytes()),
            4: rewrap(cid, msg, session=OTHER_SESSION),
            5: [msg, msg],  # sent twice
            6: rewrap(cid, msg, data=MaskedInput.from_bytes(captured[0]).data),  # client 0's vector
            7: rewrap(cid, msg, dtype="<f8"),
            8: rewrap(cid, msg, client_id=9),
            10: b"garbage",
        }.get(cid, msg)

    total, server = simulate(vectors, SecAggParams(), session=SESSION, tamper=tamper)
    expect = {1: "truncated", 2: "wrong length", 3: "out of range", 4: "another session", 5: "duplicate",
              6: "replayed", 7: "wrong dtype", 8: "claims to be from client 9", 10: "bad magic"}
    assert sorted(server.rejected) == sorted(expect)
    for cid, word in expect.items():
        assert word in server.rejected[cid], (cid, server.rejected[cid])
    assert server.survivors == [0, 9, *range(11, 24)]
    assert np.array_equal(total, plain_sum(vectors, server.survivors))  # the rejected clients' masks removed


def test_replay_from_a_previous_round():
    vectors = field_vectors(6, 1000)
    seen: set[bytes] = set()
    old: dict[int, bytes] = {}

    def record(stage, cid, msg):
        if stage == "masked":
            old[cid] = msg
        return msg

    simulate(vectors, SecAggParams(), session=SESSION, tamper=record, seen_digests=seen)

    def replay(stage, cid, msg):
        if stage == "masked" and cid == 2:
            return old[2]  # the whole old message: another session
        if stage == "masked" and cid == 3:
            return MaskedInput(OTHER_SESSION, 3, "<u8", MaskedInput.from_bytes(old[3]).data).to_bytes()
        return msg

    total, server = simulate(vectors, SecAggParams(), session=OTHER_SESSION, tamper=replay, seen_digests=seen)
    assert "another session" in server.rejected[2] and "replayed" in server.rejected[3]
    assert server.survivors == [0, 1, 4, 5]
    assert np.array_equal(total, plain_sum(vectors, server.survivors))


def corrupt_responses(bad_holders: set[int], kinds: str = "bs"):
    def tamper(stage, cid, msg):
        if stage != "unmask" or cid not in bad_holders:
            return msg
        r = UnmaskResponse.from_bytes(msg)
        b = tuple((j, corrupt(s) if "b" in kinds else s) for j, s in r.b_shares)
        s_ = tuple((j, corrupt(s) if "s" in kinds else s) for j, s in r.s_shares)
        return UnmaskResponse(r.session, r.client_id, b, s_).to_bytes()

    return tamper


def test_a_corrupted_share_is_excluded():
    vectors = field_vectors(9, 1000)
    # degree 8, t = 5: every secret has 8 (survivors 7 after the dropout) shares, one of them bad
    total, server = simulate(vectors, SecAggParams(), session=SESSION, drop_after_keys={2},
                             tamper=corrupt_responses({5}))
    assert np.array_equal(total, plain_sum(vectors, server.survivors))
    assert server.excluded_shares and all(v == [5] for v in server.excluded_shares.values())
    assert 2 in server.excluded_shares  # the dropped client's key: holder 5 has point x=4, among the first t


def test_malformed_unmask_response_is_ignored():
    vectors = field_vectors(8, 1000)

    def tamper(stage, cid, msg):
        if stage == "unmask" and cid == 3:  # a share word >= q cannot come from an honest client
            r = UnmaskResponse.from_bytes(msg)
            bad = b"\xff" * len(r.b_shares[0][1])
            return UnmaskResponse(r.session, 3, ((r.b_shares[0][0], bad), *r.b_shares[1:]), r.s_shares).to_bytes()
        if stage == "unmask" and cid == 4:
            return msg + b"\x00"
        return msg

    total, server = simulate(vectors, SecAggParams(), session=SESSION, tamper=tamper)
    assert "out of range" in server.rejected[3] and "trailing" in server.rejected[4]
    assert server.survivors == list(range(8))  # their inputs are in the sum; only their shares are ignored
    assert np.array_equal(total, plain_sum(vectors, range(8)))


def test_too_many_corrupted_shares_abort_instead_of_a_wrong_sum():
    vectors = field_vectors(6, 1000)
    # degree 5, t = 3: client 0's holders are 1..5, three of them lie -> every 3-subset holds a bad share
    with pytest.raises(SecAggError, match=r"cannot recover client \d+'s self-mask seed b: none of 10 3-subsets"):
        simulate(vectors, SecAggParams(), session=SESSION, tamper=corrupt_responses({3, 4, 5}))


def test_fewer_than_t_shares_abort_naming_the_client():
    vectors = field_vectors(6, 1000)
    lost = {1, 2, 3}  # client 0 gets shares from holders 4 and 5 only: 2 < t = 3
    with pytest.raises(SecAggError, match=r"cannot recover client 0's self-mask seed b: 2 share\(s\) received, 3"):
        simulate(vectors, SecAggParams(), session=SESSION,
                 tamper=lambda stage, cid, msg: None if stage == "unmask" and cid in lost else msg)


def test_too_few_survivors_abort():
    vectors = field_vectors(5, 100)
    with pytest.raises(SecAggError, match="min_survivors = 4"):
        simulate(vectors, SecAggParams(min_survivors=4), session=SESSION, drop_after_keys={0, 1})


# --- client-side refusals and message handling ------------------------------------------------------
def test_client_refuses_unsafe_unmask_requests():
    vectors = field_vectors(5, 100)
    clients, server, masked = run_to_masked(vectors)
    for i, m in masked.items():
        assert server.receive_masked(i, m) is None
    bad = {
        0: UnmaskRequest(SESSION, 0, (1, 2), (2, 3)),  # both shares of client 2
        1: UnmaskRequest(SESSION, 1, (0, 2), (1,)),  # marks itself as dropped
        2: UnmaskRequest(OTHER_SESSION, 2, (0, 1), ()),  # another session
        3: UnmaskRequest(SESSION, 4, (0, 1), ()),  # addressed to someone else
        4: UnmaskRequest(SESSION, 4, (0, 9), ()),  # a client whose shares it does not hold
    }
    words = {0: "both shares of client(s) [2]", 1: "itself", 2: "another session", 3: "addressed to client 4",
             4: "does not hold"}
    for i, req in bad.items():
        with pytest.raises(SecAggError, match=re.escape(words[i])):
            clients[i].unmask(req.to_bytes())
    with pytest.raises(SecAggError, match="protocol order"):  # a refused client answers nothing more
        clients[0].unmask(server.unmask_requests()[0])


def test_client_answers_one_unmask_request_only():
    vectors = field_vectors(4, 100)
    clients, server, masked = run_to_masked(vectors)
    for i, m in masked.items():
        server.receive_masked(i, m)
    requests = server.unmask_requests()
    clients[0].unmask(requests[0])
    with pytest.raises(SecAggError, match="protocol order"):  # a second (e.g. differently split) request
        clients[0].unmask(UnmaskRequest(SESSION, 0, (), (1, 2, 3)).to_bytes())


def test_server_rejects_unknown_clients_and_out_of_stage_messages():
    server = SecAggServer(SESSION, SecAggParams(), [0, 1, 2], 10, SESSION)
    c = SecAggClient(5, SESSION, SecAggParams(), 10)
    assert "unknown client" in server.receive_advert(5, c.advertise())
    c0 = SecAggClient(0, OTHER_SESSION, SecAggParams(), 10)
    assert "another session" in server.receive_advert(0, c0.advertise())
    c1 = SecAggClient(1, SESSION, SecAggParams(), 10)
    advert = c1.advertise()
    assert server.receive_advert(1, advert) is None
    assert "replay" in server.receive_advert(2, _swap_id(advert, 2))  # client 1's keys under another id
    assert "outside its stage" in server.receive_masked(1, b"")
    with pytest.raises(SecAggError, match="only 1 client"):
        server.rosters()


def _swap_id(advert: bytes, cid: int) -> bytes:
    a = Advert.from_bytes(advert)
    return Advert(a.session, cid, a.c_pk, a.s_pk).to_bytes()


def test_client_rejects_other_sessions_and_bad_inboxes():
    params = SecAggParams()
    a, b = SecAggClient(0, SESSION, params, 10), SecAggClient(1, SESSION, params, 10)
    ka, kb = Advert.from_bytes(a.advertise()), Advert.from_bytes(b.advertise())
    with pytest.raises(SecAggError, match="another session"):
        a.share_keys(Roster(OTHER_SESSION, 0, ((1, kb.c_pk, kb.s_pk),)).to_bytes())
    b.share_keys(Roster(SESSION, 1, ((0, ka.c_pk, ka.s_pk),)).to_bytes())
    c = SecAggClient(2, SESSION, params, 10)
    c.advertise()
    share_c = ShareMessage.from_bytes(c.share_keys(Roster(SESSION, 2, ((1, kb.c_pk, kb.s_pk),)).to_bytes()))
    # a ciphertext addressed to client 1 but relabelled as coming from client 0 fails authentication
    with pytest.raises(SecAggError, match="failed authentication"):
        b.receive_shares(Inbox(SESSION, 1, ((0, share_c.ciphertexts[0][1]),)).to_bytes())


def test_messages_round_trip_and_malformed_bytes_raise_value_error():
    key = bytes(32)
    msgs = [
        Advert(SESSION, 1, key, b"\x01" * 32),
        Roster(SESSION, 2, ((3, key, key), (4, key, key))),
        ShareMessage(SESSION, 2, b"\x05" * 32, ((3, b"ct"), (4, b""))),
        Inbox(SESSION, 3, ((2, b"ct"),)),
        MaskedInput.from_array(SESSION, 4, np.arange(5, dtype=np.uint64)),
        UnmaskRequest(SESSION, 5, (1, 2), (3,)),
        UnmaskResponse(SESSION, 6, ((1, b"s"),), ()),
    ]
    for m in msgs:
        data = m.to_bytes()
        assert isinstance(data, bytes) and type(m).from_bytes(data) == m
        for broken in (data[:-1], data + b"\x00", b"XXXX" + data[4:], data[:5]):
            with pytest.raises(ValueError, match="malformed"):
                type(m).from_bytes(broken)
    with pytest.raises(ValueError, match="kind"):
        Roster.from_bytes(msgs[0].to_bytes())
    with pytest.raises(ValueError, match="expected bytes"):
        Advert.from_bytes("text")  # type: ignore[arg-type]
    # a count field claiming more items than the bytes can hold is refused before any allocation
    huge = bytearray(UnmaskRequest(SESSION, 5, (), ()).to_bytes())
    huge[-8:-4] = (2**31).to_bytes(4, "little")
    with pytest.raises(ValueError, match="declares"):
        UnmaskRequest.from_bytes(bytes(huge))


# --- privacy of a single masked vector -----------------------------------------------------------------
def test_masked_vector_is_independent_of_its_plaintext():
    n = 75_000
    k = np.arange(n)
    rng = np.random.default_rng(5)
    plain = {
        0: encode_fixed(1000 * np.sin(k / 500.0), 24, 3, rng),  # smooth, half negative (values near p)
        1: np.where(k % 2 == 0, 0, P - 1).astype(np.uint64),  # the two extremes of Z_p, alternating
        2: np.zeros(n, dtype=np.uint64),
    }
    _, _, masked = run_to_masked(plain)
    ys = {i: np.frombuffer(MaskedInput.from_bytes(masked[i]).data, dtype="<u8") for i in (0, 1)}
    threshold_5_sigma = 5 / math.sqrt(n)  # |Pearson r| of independent samples is ~N(0, 1/n): 5 sd = 0.018
    for i, y in ys.items():
        # uniform over Z_p: the top 4 of 61 bits fall in 16 bins of equal probability (bin 15 is
        # 2**57 - 1 values wide instead of 2**57: negligible); chi-square with 15 degrees of freedom,
        # scipy.stats.chi2.isf(1e-6, 15) = 56.49
        counts = np.bincount((y >> np.uint64(57)).astype(np.int64), minlength=16)
        chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
        assert counts.size == 16 and chi2 < 56.49, (i, chi2)
        r = np.corrcoef(y.astype(np.float64), plain[i].astype(np.float64))[0, 1]
        assert abs(r) < threshold_5_sigma, (i, r)
    assert abs(np.corrcoef(ys[0].astype(np.float64), ys[1].astype(np.float64))[0, 1]) < threshold_5_sigma


def test_client_state_survives_a_new_process_per_message():
    # On Flower each protocol message runs in a fresh ClientApp process: the client's state is pickled to the
    # owner's disk between steps (private keys as raw bytes). The sum must still be exact, dropout included.
    import pickle

    vectors = field_vectors(6, 300, seed=5)
    params = SecAggParams()
    ids, drop = sorted(vectors), {2}
    server = SecAggServer(SESSION, params, ids, 300, graph_seed=SESSION)
    disk = {i: pickle.dumps(SecAggClient(i, SESSION, params, 300)) for i in ids}

    def step(i, fn, *args):
        client = pickle.loads(disk[i])
        out = getattr(client, fn)(*args)
        disk[i] = pickle.dumps(client)
        return out

    for i in ids:
        assert server.receive_advert(i, step(i, "advertise")) is None
    for i, roster in server.rosters().items():
        assert server.receive_shares(i, step(i, "share_keys", roster)) is None
    for i, box in server.inboxes().items():
        step(i, "receive_shares", box)
    for i in ids:
        if i not in drop:  # client 2 vanishes after the key exchange
            server.receive_masked(i, step(i, "mask", vectors[i]))
    for i, req in server.unmask_requests().items():
        server.receive_unmask(i, step(i, "unmask", req))
    assert np.array_equal(server.result(), plain_sum(vectors, sorted(set(ids) - drop)))
    assert len(pickle.loads(disk[0]).__getstate__()["_c_sk"]) == 32  # an X25519 key as raw bytes
