"""``fedfm eval``: reload a run's final model from its Hugging Face files and evaluate it."""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.app import App
from fedfm.errors import FedFMError
from fedfm.models import pass_prefix_as_cache, resolve_model_path
from fedfm.rundir import RunDir


def load_final(final: Path, source: str, task: str = "classification"):
    """A peft adapter directory (rebuilt on the base model) or a full model directory -> model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "retrieval":  # an encoder: adapter merged into its base, or a full model dir
        from fedfm.rag.embed import load_encoder

        if not (final / "adapter_config.json").is_file() and not (final / "config.json").is_file():
            raise FedFMError(f"no final model in {final}: is the run complete?")
        return load_encoder(str(final))[0]
    auto = AutoModelForCausalLM if task in ("causal_lm", "instruction") else AutoModelForSequenceClassification
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        if source == "scratch":
            raise FedFMError("an adapter on a 'scratch' model cannot be reloaded: its random base was never saved")
        base_cfg = AutoConfig.from_pretrained(final / "base_config")
        base = auto.from_pretrained(resolve_model_path(source), config=base_cfg)
        model = PeftModel.from_pretrained(base, final)
        pass_prefix_as_cache(model)
        return model
    if (final / "config.json").is_file():
        return auto.from_pretrained(final)
    raise FedFMError(f"no final model in {final}: is the run complete?")


def evaluate_run(run_dir: Path) -> dict:
    """The final model(s) on the global test set and the owners' own splits; each owner's personal model (when the
    run personalized) on its own split."""
    rd = RunDir(run_dir)
    cfg = rd.load_config()
    if rd.status().get("status") != "complete":
        raise FedFMError(f"run {run_dir} is not complete (status {rd.status().get('status')}): resume it first")
    app = App(cfg)
    finals = [(run_dir / "final", None)]
    if not (run_dir / "final" / "config.json").exists() and not (run_dir / "final" / "adapter_config.json").exists():
        # local: one model per client
        finals = [(run_dir / "final" / name, i) for i, name in enumerate(app.split.client_names)]
    personal = run_dir / "personal"  # personal.method: each owner's own model, scored on its own split only
    finals += [(personal / name, i) for i, name in enumerate(app.split.client_names) if (personal / name).is_dir()]
    rows = []
    for path, index in finals:
        app.model = load_final(path, cfg.model.source, cfg.task)
        name = "final" if index is None else f"personal/{path.name}" if path.parent == personal else path.name
        if path.parent != personal:
            rows.append({"model": name, "split": "global test",
                         **app.task.evaluate(app.model, app.global_test, cfg.eval.batch_size)})
        clients = range(len(app.split.client_names)) if index is None else [index]
        for i in clients:
            if len(app.shards[i].test):
                rows.append({"model": name, "split": f"{app.shards[i].name} test", **app.task.evaluate(app.model, app.shards[i].test, cfg.eval.batch_size)})
    result = {"run_dir": str(run_dir), "rows": rows}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return result
