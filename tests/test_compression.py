"""Update codecs: round trips, exact byte counts, stochastic rounding, top-k indices, error feedback, malformed
messages; the per-client state store; SCAFFOLD's server step. Plain tensors, no model."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedfm import codec as messages
from fedfm.compression import CHUNK, KEY, UpdateCodec, cast_broadcast, flatten, with_feedback
from fedfm.store import ClientStates
from fedfm.features.scaffold import CONTROL
from fedfm.strategies import Scaffold
from fedfm.types import ClientUpdate, ServerState


def ref(n_a=300, n_b=(4, 5)):
    return {"b": torch.zeros(n_b), "a": torch.zeros(n_a)}


def rand_update(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in ref(**kw).items()}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def payload_bytes(message: bytes) -> int:
    """Bytes of tensor data in a safetensors message: total - 8-byte length - JSON header."""
    (header_len,) = struct.unpack("<Q", message[:8])
    return len(message) - 8 - header_len


def header(message: bytes) -> dict:
    (n,) = struct.unpack("<Q", message[:8])
    return json.loads(message[8 : 8 + n])


def test_float_codecs_round_trip_and_byte_count():
    d = rand_update()
    n = 300 + 20
    for stage, width, dtype in (([], 4, torch.float32), (["fp16"], 2, torch.float16), (["bf16"], 2, torch.bfloat16)):
        c = UpdateCodec(stage, ref())
        msg, decoded = c.encode(d, gen())
        wire = messages.encode(msg)
        assert payload_bytes(wire) == width * n  # one flat vector: n values of `width` bytes, no per-tensor names
        back = c.decode(messages.decode(wire))
        for k in d:
            assert torch.equal(back[k], d[k].to(dtype).float())
            assert torch.equal(decoded[k], back[k])  # what the client believes it sent is what the server decodes


def test_int8_stochastic_rounding_is_unbiased_and_within_one_step():
    x = {"a": torch.linspace(-1, 1, 300), "b": torch.zeros(4, 5)}
    c = UpdateCodec(["int8"], ref(), block_size=64)
    outs = torch.stack([flatten(c.encode(x, gen(s))[1]) for s in range(400)])
    flat = flatten(x)
    # blocks of 64: the absmax of each block / 127 is one quantisation step; every decode is within one step
    step = torch.tensor([flat[i : i + 64].abs().max() / 127 for i in range(0, 320, 64)]).repeat_interleave(64)[:320]
    assert ((outs - flat).abs() <= step + 1e-7).all()
    # unbiased: the mean of 400 decodes is within 4 standard errors (step / (2 sqrt(400)) at most) of x
    assert ((outs.mean(0) - flat).abs() <= 4 * step / (2 * 20) + 1e-7).all()
    # deterministic rounding would be biased on 0.3 steps: it always rounds down to 0
    msg, _ = c.encode(x, gen())
    wire = messages.encode(msg)
    assert payload_bytes(wire) == 320 + 4 * 5  # 320 int8 codes + 5 float32 block scales


def test_int4_packs_two_codes_per_byte_odd_length():
    r = {"a": torch.zeros(7)}
    x = {"a": torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0])}
    c = UpdateCodec(["int4"], r, block_size=8)
    msg, dec = c.encode(x, gen())
    assert msg[KEY + "codes"].dtype == torch.uint8 and msg[KEY + "codes"].numel() == 4  # ceil(7 / 2)
    # scale = 1 / 7: exact grid points (-1, 0, 1 -> codes -7, 0, 7) decode exactly
    assert dec["a"][0] == -1 and dec["a"][2] == 0 and dec["a"][6] == 1
    assert ((dec["a"] - x["a"]).abs() <= 1 / 7 + 1e-7).all()


def test_topk_keeps_the_largest_and_sends_two_bytes_per_index():
    x = {"a": torch.zeros(300), "b": torch.zeros(4, 5)}
    x["a"][[5, 17, 250]] = torch.tensor([3.0, -4.0, 2.5])
    x["b"][1, 2] = -10.0
    c = UpdateCodec(["topk"], ref(), topk_fraction=4 / 320)  # k = ceil(4 / 320 * 320) = 4
    msg, dec = c.encode(x, gen())
    for k in x:
        assert torch.equal(dec[k], x[k])  # exactly 4 non-zeros: nothing lost
    assert msg[KEY + "offsets"].dtype == torch.uint16
    assert payload_bytes(messages.encode(msg)) == 4 * 2 + 4 * 1 + 4 * 4  # offsets, one chunk count, fp32 values


def test_topk_indices_across_chunks():
    n = CHUNK * 2 + 10
    r = {"w": torch.zeros(n)}
    x = {"w": torch.zeros(n)}
    pos = [0, CHUNK - 1, CHUNK, 2 * CHUNK + 9]
    x["w"][pos] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c = UpdateCodec(["topk", "fp16"], r, topk_fraction=4 / n)
    msg, dec = c.encode(x, gen())
    assert msg[KEY + "counts"].tolist() == [2, 1, 1]
    assert torch.nonzero(c.decode(msg)["w"]).flatten().tolist() == pos


def test_error_feedback_accumulates_exactly_what_was_not_sent():
    c = UpdateCodec(["topk", "int8"], ref(), topk_fraction=0.05)
    residual, sent, total_in = None, torch.zeros(320), torch.zeros(320)
    for r in range(5):
        d = rand_update(seed=r)
        msg, new_residual = with_feedback(c, d, residual, gen(r))
        target = flatten(d) + (flatten(residual) if residual is not None else 0)
        decoded = flatten(c.decode(msg))
        assert torch.equal(flatten(new_residual), target - decoded)  # residual = input - what the server got
        residual = new_residual
        sent += decoded
        total_in += flatten(d)
    # telescoping: everything the client produced = everything sent + what it still holds
    assert torch.allclose(sent + flatten(residual), total_in, atol=1e-5)


def test_topk_int8_of_a_lora_sized_update_is_over_100x_smaller():
    # the MiniLM LoRA r=8 adapter with a 3-class head (the tweets): 74,883 trainable float32 coordinates
    r = {"w": torch.zeros(74_883)}
    x = {"w": torch.randn(74_883, generator=gen())}
    raw = len(messages.encode(x))
    c = UpdateCodec(["topk", "int4"], r, topk_fraction=0.01)
    small = len(messages.encode(c.encode(x, gen())[0]))
    # 749 kept: 749 x 2 B offsets + 2 x 4 B chunk counts + 375 B of int4 codes + 3 x 4 B scales + header
    assert payload_bytes(messages.encode(c.encode(x, gen())[0])) == 749 * 2 + 8 + 375 + 12
    assert raw / small > 100


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m.update({KEY + "offsets": torch.from_numpy(m[KEY + "offsets"].numpy()[::-1].copy())}), "strictly increasing"),
        (lambda m: m.update({KEY + "counts": torch.tensor([99], dtype=torch.int32)}), "counts do not match"),
        (lambda m: m.update({KEY + "codes": m[KEY + "codes"][:-1]}), "int8 codes"),
        (lambda m: m.update({KEY + "scales": torch.tensor([float("nan")])}), "finite"),
        (lambda m: m.update({"a": torch.zeros(3)}), "not a compressed message"),
        (lambda m: m.pop(KEY + "scales"), "lacks"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(mutate, match):
    c = UpdateCodec(["topk", "int8"], ref(), topk_fraction=0.1)
    msg, _ = c.encode(rand_update(), gen())
    mutate(msg)
    with pytest.raises(ValueError, match=match):
        c.decode(msg)


def test_broadcast_precision():
    w = {"a": torch.tensor([1.0 + 2**-12])}
    assert cast_broadcast(w, "none") is w
    assert cast_broadcast(w, "fp16")["a"].dtype == torch.float16
    assert cast_broadcast(w, "bf16")["a"].item() == 1.0  # bf16 keeps 8 bits of mantissa


def test_client_states_versions_survive_a_crashed_round(tmp_path):
    s = ClientStates(tmp_path)
    assert s.get("c1", 1) is None
    s.put("c1", 1, {"x": torch.tensor([1.0])})
    s.put("c1", 2, {"x": torch.tensor([2.0])})
    assert s.get("c1", 3)["x"].item() == 2.0
    # a crash during round 3 after c1 wrote its round-3 state; the run resumes at round 3 and must read round 2's
    s.put("c1", 3, {"x": torch.tensor([3.0])})
    fresh = ClientStates(tmp_path)  # a resumed process scans the directory
    assert fresh.get("c1", 3)["x"].item() == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.2.safetensors", "c1.3.safetensors"]  # at most two kept
    assert fresh.clients() == 1 and fresh.disk_bytes() > 0


def test_scaffold_server_step_by_hand():
    # N = 4 clients, 2 report. x = 1, c = 0.5; dy = (0.2, 0.4) with examples (1, 3); dc = (1, -3)
    # x' = 1 + (0.2 * 1 + 0.4 * 3) / 4 = 1.35; c' = 0.5 + 2/4 * (1 - 3) / 2 = 0.0
    st = ServerState(0, {"w": torch.tensor([1.0])}, {"c.w": torch.tensor([0.5])})
    ups = [
        ClientUpdate("a", {"w": torch.tensor([0.2]), CONTROL + "w": torch.tensor([1.0])}, 1),
        ClientUpdate("b", {"w": torch.tensor([0.4]), CONTROL + "w": torch.tensor([-3.0])}, 3),
    ]
    new = Scaffold(num_clients=4).aggregate(st, ups)
    assert new.weights["w"].item() == pytest.approx(1.35)
    assert new.opt["c.w"].item() == pytest.approx(0.0)
    assert Scaffold().task_config(st)["control"]["w"].item() == 0.5


def test_sign_codec_one_bit_per_value_and_mean_magnitude_scales():
    r = {"a": torch.zeros(6)}
    x = {"a": torch.tensor([1.0, -3.0, 2.0, -2.0, 0.5, -0.5])}
    c = UpdateCodec(["sign"], r, block_size=4)
    msg, dec = c.encode(x, gen())
    # block 1: mean |1, -3, 2, -2| = 2; block 2: mean |0.5, -0.5| = 0.5
    assert dec["a"].tolist() == [2.0, -2.0, 2.0, -2.0, 0.5, -0.5]
    assert payload_bytes(messages.encode(msg)) == 1 + 2 * 4  # 6 bits in one byte + 2 float32 scales


def test_randk_sends_a_seed_instead_of_indices():
    x = rand_update()
    c = UpdateCodec(["randk", "sign"], ref(), topk_fraction=0.25, block_size=80)
    msg, dec = c.encode(x, gen(1))
    flat_dec, flat_x = flatten(dec), flatten(x)
    kept = torch.nonzero(flat_dec).flatten()
    assert kept.numel() == 80  # ceil(0.25 * 320)
    assert torch.equal(torch.sign(flat_dec[kept]), torch.sign(flat_x[kept]))
    # 8-byte seed + 80 bits + 1 scale: no index travels
    assert payload_bytes(messages.encode(msg)) == 8 + 10 + 4
    other = flatten(c.encode(x, gen(2))[1])
    assert not torch.equal(torch.nonzero(other).flatten(), kept)  # another round / client: another subset
    msg[KEY + "seed"] = torch.tensor([-1])
    with pytest.raises(ValueError, match="seed"):
        c.decode(msg)
