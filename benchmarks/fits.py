"""What fits where: a client's estimated peak memory for common model sizes and training set-ups.

Estimates, not measurements: ``fedfm.sizing`` (the formula behind ``fedfm info CONFIG``) on each architecture built
on PyTorch's meta device from its public config values (no weights are read). The measured rows that check the
formula are in memory_levers.md (0.5B on the CPU) and gpu.md (SmolLM2 on a GPU, when one was lent).

    python benchmarks/fits.py     # seconds; writes results/fits.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import result_header  # noqa: E402

GIB = 2**30
# Llama-architecture configs with the public sizes of these models (config.json values)
MODELS = {
    "SmolLM2-135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "Qwen2.5-0.5B-size": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "Mistral-7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False),
    "Llama-3-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
LORA = ["peft.method=lora", "peft.options={r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}"]
SETUPS = {
    "full fine-tuning, float32": ["peft.method=none"],
    "full fine-tuning, bf16 weights + checkpointing": ["peft.method=none", "model.dtype=bfloat16",
                                                       "train.gradient_checkpointing=true"],
    "LoRA r=16, bf16 base": [*LORA, "model.dtype=bfloat16"],
    "QLoRA r=16, 4-bit base + checkpointing": [*LORA, "model.quantization=4bit", "model.dtype=bfloat16",
                                              "train.gradient_checkpointing=true"],
}
TOKENS = ["data.max_length=512", "train.batch_size=16", "train.micro_batch_size=4"]


def where(gib: float) -> str:
    if gib <= 16:
        return "16 GB GPU (T4, RTX 4080)"
    if gib <= 24:
        return "24 GB GPU (L4, RTX 4090)"
    if gib <= 80:
        return "80 GB GPU (A100 / H100)"
    return "more than one 80 GB GPU: not on one device"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from fedfm import config
    from fedfm.sizing import estimate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in MODELS.items():
            d = Path(tmp) / name
            d.mkdir()
            (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                       "max_position_embeddings": 4096, **arch}))
            for setup, sets in SETUPS.items():
                cfg = config.load(None, ["task=causal_lm", "data.source=shakespeare", f"model.source={d}",
                                         "federation.num_clients=10", *TOKENS, *sets])
                s = estimate(cfg)
                rows.append({"model": name, "setup": setup, "params": s.total_params, "trainable": s.trainable_params,
                             "weights_gib": s.weights_bytes / GIB,
                             "training_gib": (s.training_bytes + s.gradient_bytes + s.optimizer_bytes) / GIB,
                             "activations_gib": s.activation_bytes / GIB, "peak_gib": s.peak_bytes / GIB,
                             "mb_per_client_round": s.bytes_up / (s.clients_per_round or 1) / 1e6,
                             "fits": where(s.peak_bytes / GIB)})
    command, info, header = result_header("What fits where (estimates)", "benchmarks/fits.py")
    lines = header + ["", "Estimated peak memory of one client's training step (`fedfm info CONFIG`, formula in "
                      "`fedfm/sizing.py`): sequences of 512 tokens, batch 16 as micro-batches of 4, AdamW. Weights, "
                      "trainable weights and the float32 start, then the largest of backward (gradients + "
                      "activations), step (gradients + AdamW moments) and hand-off (moments + the float32 update); "
                      "the training-state column is trainable weights + start + gradients + moments; "
                      "the interpreter and the data (about 1 GiB on the CPU) come on top. Estimates, marked as such: "
                      "the measured rows are in memory_levers.md and gpu.md.", "",
                      "| model | set-up | parameters | trainable (travels) | MB up per client per round | weights | "
                      "training state | activations | estimated peak | fits on |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setup']} | {r['params'] / 1e9:.2f}B | {r['trainable'] / 1e6:,.1f}M | "
                     f"{r['mb_per_client_round']:,.0f} | {r['weights_gib']:.1f} GiB | {r['training_gib']:.1f} GiB | "
                     f"{r['activations_gib']:.1f} GiB | {r['peak_gib']:.1f} GiB (estimate) | {r['fits']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fits.md").write_text(md)
    (args.out / "fits.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
