"""Instruction tuning (task=instruction): chat template, response-only loss masking token by token, soft-prompt
initialisation from real text, metrics worked by hand, data sources, config rules, and a tiny end-to-end run.

The tokenizer and chat template are SmolLM2-135M-Instruct's (in the fedfm cache after `fedfm data fetch`); the
masking and prefix tests use a tiny randomly initialised Llama with that vocabulary, so they take seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedfm import config, server
from fedfm.config import PeftSection
from fedfm.data.instructions import chatterbot_instructions, foldoc_instructions, short_response
from fedfm.errors import ConfigError, DataError
from fedfm.models import load_tokenizer
from fedfm.tasks.instruction import IGNORE, InstructionTask, encode_dialogs, normalise, render

QA = [("What is a byte?", "Eight bits."), ("What is RAM?", "Random-access memory, the main memory of a computer.")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_labels_are_the_response_tokens_exactly(tok):
    d = encode_dialogs(tok, [q for q, _ in QA], [r for _, r in QA], max_length=128)
    b = InstructionTask.batch(d, torch.arange(2))
    for i, (q, r) in enumerate(QA):
        ids, labels = b["input_ids"][i], b["labels"][i]
        n, p = int(d.lengths[i]), int(d.prompt_lengths[i])
        # token by token: -100 on the prompt and on padding, the token itself on the response
        for t in range(ids.shape[0]):
            assert int(labels[t]) == (int(ids[t]) if p <= t < n else IGNORE), (i, t)
        assert tok.decode(ids[:p]) == render(tok, q)  # the prompt is exactly the template's generation prompt
        assert tok.decode(ids[p:n]) == f"{r}<|im_end|>\n"  # the trained part: the reply and its end of turn
        assert tok.decode(ids[:n]) == render(tok, q, r)
        assert b["attention_mask"][i].sum() == n


def test_system_prompt_replaces_the_template_default(tok):
    d = encode_dialogs(tok, [QA[0][0]], [QA[0][1]], max_length=128, system="Be brief.")
    p, n = int(d.prompt_lengths[0]), int(d.lengths[0])
    assert tok.decode(d.input_ids[0, :p]) == render(tok, QA[0][0], system="Be brief.")
    assert "Be brief." in d.prompts[0] and "SmolLM" not in d.prompts[0]
    assert tok.decode(d.input_ids[0, p:n]) == "Eight bits.<|im_end|>\n"


def test_loss_counts_response_tokens_only(tok, tiny_lm):
    d = encode_dialogs(tok, [q for q, _ in QA], [r for _, r in QA], max_length=128)
    b = InstructionTask.batch(d, torch.arange(2))
    with torch.no_grad():
        got = InstructionTask.loss(tiny_lm, b)
        logits = tiny_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    # by hand: next-token cross-entropy averaged over the response positions of both rows
    terms = []
    for i in range(2):
        p, n = int(d.prompt_lengths[i]), int(d.lengths[i])
        for t in range(p, n):  # token t is predicted from position t-1
            terms.append(F.cross_entropy(logits[i, t - 1][None], b["input_ids"][i, t][None]))
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


def test_prompt_tuning_masks_virtual_tokens(tok, tiny_lm):
    """peft prepends the soft prompt and its labels are -100: the loss is still over response tokens only."""
    import copy

    from peft import get_peft_model

    from fedfm.models import peft_config

    model = get_peft_model(copy.deepcopy(tiny_lm), peft_config(PeftSection(method="prompt_tuning", options={"num_virtual_tokens": 5}), "CAUSAL_LM"))
    d = encode_dialogs(tok, [QA[1][0]], [QA[1][1]], max_length=128)
    b = InstructionTask.batch(d, torch.arange(1))
    with torch.no_grad():
        got = model(**b).loss
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 5:]  # drop virtual positions
    p, n = int(d.prompt_lengths[0]), int(d.lengths[0])
    want = F.cross_entropy(logits[0, p - 1 : n - 1], b["input_ids"][0, p:n])
    assert torch.allclose(got, want, atol=1e-5)


def test_truncation_cuts_the_response_and_rejects_a_prompt_that_does_not_fit(tok):
    long = " ".join(["word"] * 200)
    d = encode_dialogs(tok, ["Say many words"], [long], max_length=60)
    assert int(d.lengths[0]) == 60 and int(d.prompt_lengths[0]) < 60
    with pytest.raises(DataError, match="example 0: the prompt is .* data.max_length=20"):
        encode_dialogs(tok, [long], ["x"], max_length=20)


def test_prefix_init_from_text_equals_the_text_as_real_context(tok, tiny_lm):
    """A prefix initialised from a text's key/value activations makes the model act as if the text came first."""
    import copy

    from peft import get_peft_model

    from fedfm.models import init_prefix_from_text, peft_config

    text = "Define the term like a dictionary."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    model = get_peft_model(copy.deepcopy(tiny_lm), peft_config(PeftSection(method="prefix_tuning", options={"num_virtual_tokens": len(ids)}), "CAUSAL_LM"))
    init_prefix_from_text(model, tok, text)
    x = torch.tensor([tok("What is RAM?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        prefixed = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        real = tiny_lm(input_ids=torch.cat([torch.tensor([ids]), x], 1)).logits[:, len(ids):]
    assert torch.allclose(prefixed, real, atol=1e-4)


def test_rouge_l_and_exact_match_by_hand(tok):
    task = InstructionTask(tok)
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 tokens: P = 5/5, R = 5/6, F1 = 2PR/(P+R) = 10/11
    s = task.score("the cat on the mat", "the cat sat on the mat")
    assert s["rougeL"] == pytest.approx(10 / 11) and s["exact_match"] == 0.0
    assert task.score("Richard Nixon.", "richard  nixon")["exact_match"] == 1.0
    assert normalise("  Hello, World! ") == "hello world"


def test_short_response_by_hand():
    assert short_response("One two three. Four five six seven eight nine ten. Eleven", 8) == "One two three."
    assert short_response("x y z w v u t", 4) == "x y z w"  # no sentence end: cut at the word limit
    assert short_response("def f():\n    return 1", 8) == "def f():\n    return 1"  # layout kept


def test_instruction_sources_have_natural_owners():
    texts, responses, owners = foldoc_instructions(4, 24)
    assert len(texts) == len(responses) == len(owners) > 10000
    assert set(owners) == {"language", "networking", "programming", "jargon", "other"}
    assert all(t.startswith("What is ") for t in texts[:50]) and all(len(r.split()) <= 24 for r in responses)
    texts, responses, owners = chatterbot_instructions(None, 24)
    assert len(texts) > 1500 and {"trivia", "coding", "tech_support"} <= set(owners)
    i = texts.index("Who was the 37th President of the United States?")
    assert responses[i] == "Richard Nixon" and owners[i] == "trivia"


def test_config_rules():
    base = ["task=instruction", "model.source=smollm2"]
    with pytest.raises(ConfigError, match="data.source=tweets does not give"):
        config.load(None, base)
    with pytest.raises(ConfigError, match="needs a pretrained chat model"):
        config.load(None, ["task=instruction", "data.source=foldoc"])
    with pytest.raises(ConfigError, match="set task=instruction"):
        config.load(None, ["data.source=chatterbot"])
    with pytest.raises(ConfigError, match="set task=instruction"):
        config.load(None, ["data.source=jsonl", "data.path=x.jsonl", "data.response_column=answer"])
    config.load("configs/instruct_foldoc.yaml")
    config.load("configs/instruct_chatterbot.yaml")


def test_jsonl_instruction_pairs(tmp_path):
    from fedfm.data import load_dataset

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}", "owner": f"o{i % 2}"}) for i in range(6)))
    cfg = config.load(None, ["task=instruction", "model.source=smollm2", "data.source=jsonl", f"data.path={path}",
                             "data.text_column=q", "data.response_column=a", "data.key_column=owner"]).data
    ds = load_dataset(cfg, 0, "instruction")
    assert ds.texts[3] == "question 3" and ds.passages[3] == "answer 3" and list(ds.keys[:2]) == ["o0", "o1"]
    path.write_text(json.dumps({"q": "x", "a": "", "owner": "o0"}) + "\n")
    with pytest.raises(DataError, match="line 1 has a null/empty 'a'"):
        load_dataset(cfg, 0, "instruction")


@pytest.mark.slow
def test_tiny_federated_instruction_run(tmp_path):
    """Two chatterbot owners, one round, LoRA: the run directory is complete and the report shows samples."""
    cfg = config.load("configs/instruct_chatterbot.yaml", [
        "rounds=1", "data.owner_count=1", "data.max_per_key=12", "data.max_length=64", "train.local_steps=1",
        "train.batch_size=2", "eval.generate=2", "eval.max_new_tokens=4", "eval.samples=2", f"output_dir={tmp_path}",
        "engine.threads=1",
    ])
    run_dir = server.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"rougeL", "exact_match", "perplexity"} <= set(summary["global"])
    assert len(summary["per_client"]) == 2 and summary["per_client"][0]["own"]["perplexity"] > 1
    samples = json.loads((run_dir / "samples.json").read_text())
    assert len(samples[0]["samples"]) == 2
    html = (run_dir / "report.html").read_text()
    assert "Generated samples" in html and "ROUGE-L" in html
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    # `fedfm eval` rebuilds the model from the saved HF adapter: the same numbers as the run's final evaluation
    from fedfm.evaluate import evaluate_run

    row = evaluate_run(run_dir)["rows"][0]
    assert row["perplexity"] == pytest.approx(summary["global"]["perplexity"], rel=1e-4)
    assert row["rougeL"] == pytest.approx(summary["global"]["rougeL"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "none"])
def test_each_tuning_method_trains_and_sends_only_its_tensors(method):
    from fedfm.app import App
    from fedfm.types import ClientTask

    cfg = config.load("configs/instruct_chatterbot.yaml", [
        "data.owner_count=1", "data.max_per_key=12", "data.max_length=64", "train.local_steps=1", "train.batch_size=2",
        "eval.generate=1", "eval.max_new_tokens=2", f"peft.method={method}", "engine.threads=1",
        "peft.init_text=Answer briefly.",
    ])
    app = App(cfg)
    update = app.client_train(0, ClientTask(1, app.initial_weights))
    sizes = {"prompt_tuning": 20 * 576, "prefix_tuning": 20 * 30 * 2 * 192, "none": app.total_params}
    sent = sum(t.numel() for t in update.delta.values())
    if method in sizes:  # 20 virtual tokens x hidden 576; prefix: x 30 layers x (key, value) x 3 kv-heads x 64
        assert sent == sizes[method]
    assert sent == app.trainable_params and torch.isfinite(torch.tensor(update.metrics["train_loss"]))
    assert any(t.abs().sum() > 0 for t in update.delta.values())
    m = app.server_evaluate({k: app.initial_weights[k] + update.delta[k] for k in update.delta})
    assert m["perplexity"] > 1 and 0 <= m["rougeL"] <= 1
