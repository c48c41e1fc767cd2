"""Prefix tuning on the BERT-family encoder (all-MiniLM-L6-v2) across transformers releases.

transformers 5.24 renamed the encoders' ``past_key_values`` argument to ``cache``; peft 0.21.2 looks for the old
name and refused the model. ``fedfm.models.pass_prefix_as_cache`` hands the prefix on under the new name. The
expected logits were computed by peft's own prefix path under transformers 5.23.0 (tests/fixtures/prefix_reference.py
wrote them), so this covers 5.23 (where the shim is a no-op) and every later 5.x the lock or check-latest installs.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIX))
from prefix_reference import reference_logits  # noqa: E402

from fedfm.config import PeftSection  # noqa: E402
from fedfm.models import Build, load_classifier, load_tokenizer  # noqa: E402


def test_prefix_tuned_encoder_gives_peft_reference_logits():
    ref = json.loads((FIX / "prefix_minilm_logits.json").read_text())
    assert ref["transformers"] == "5.23.0"
    torch.testing.assert_close(reference_logits(), torch.tensor(ref["logits"]), atol=1e-5, rtol=1e-4)


def test_the_prefix_reaches_the_encoder_and_survives_a_copy():
    model = load_classifier("minilm", ["a", "b"], Build(PeftSection(method="prefix_tuning", options={"num_virtual_tokens": 4}), 0))
    batch = load_tokenizer("minilm")(["the flight was late again"], return_tensors="pt")
    model.eval()
    twin = copy.deepcopy(model)
    emb = twin.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.add_(torch.randn_like(emb))
        before = model(**batch).logits
        after = twin(**batch).logits
    # the copy's own prefix changed and so did its logits; the original model is untouched by the copy
    assert (after - before).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)
