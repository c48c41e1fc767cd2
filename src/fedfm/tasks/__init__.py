"""Learning tasks: how a batch is built from a client's data, what loss is trained, what is measured.

``build_task`` turns a config's task into the tokenizer, the task object, the model and the function that encodes
a participant's examples, so the App is the same for every task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedfm.models import (
    Build, load_causal_lm, load_classifier, load_encoder_for_training, load_lm_tokenizer, load_tokenizer,
)
from fedfm.placement import Placement
from fedfm.tasks.causal_lm import CausalLMTask, pack
from fedfm.tasks.classification import ClassificationTask, encode
from fedfm.tasks.instruction import InstructionTask, encode_dialogs
from fedfm.tasks.retrieval import RetrievalTask, encode_pairs


def build_task(cfg, dataset, split, where: Placement) -> tuple[Any, Any, Any, Callable]:
    """(tokenizer, task, model, data) for ``cfg.task``; ``data(indices)`` encodes those examples of ``dataset``.
    The model is built on ``where``'s device and in its precision."""
    build = Build(cfg.peft, cfg.seed, where, cfg.model.quantization, cfg.train.gradient_checkpointing,
                  ("trainable" if cfg.head.calibrate == "ccvr" else "frozen") if cfg.head.loss == "fedetf" else None)
    if cfg.task == "classification":
        tokenizer = load_tokenizer(cfg.model.source)
        encoded = encode(tokenizer, dataset.texts, dataset.labels, cfg.data.max_length)
        model = load_classifier(cfg.model.source, dataset.label_names, build)
        return tokenizer, ClassificationTask(len(dataset.label_names)), model, encoded.subset
    if cfg.task == "instruction":
        tokenizer = load_tokenizer(cfg.model.source)
        dialogs = encode_dialogs(tokenizer, dataset.texts, dataset.passages, cfg.data.max_length, cfg.data.system_prompt)
        task = InstructionTask(tokenizer, cfg.eval.generate, cfg.eval.max_new_tokens)
        return tokenizer, task, load_causal_lm(cfg.model.source, tokenizer, cfg.model.arch, build), dialogs.subset
    if cfg.task == "retrieval":
        tokenizer = load_tokenizer(cfg.model.source)
        pairs = encode_pairs(tokenizer, dataset.texts, dataset.passages, cfg.data.max_length)
        return tokenizer, RetrievalTask(), load_encoder_for_training(cfg.model.source, build), pairs.subset
    texts = dataset.texts
    # a trained BPE sees the training pool only (clients' and server's training text), never test text
    pool = [texts[i] for part in (*split.client_train, split.server) for i in part]
    tokenizer = load_lm_tokenizer(cfg.model.source, cfg.model.tokenizer, pool, cfg.model.vocab_size)

    def data(idx):  # each participant's documents packed on their own: no block spans two owners
        return pack(tokenizer, [texts[i] for i in idx], cfg.data.max_length)

    return tokenizer, CausalLMTask(), load_causal_lm(cfg.model.source, tokenizer, cfg.model.arch, build), data
