"""Causal language modelling: documents packed into fixed-length blocks, next-token loss, perplexity.

Packing follows the ``group_texts`` step of Hugging Face's ``run_clm`` example (an example script,
not a library function, hence written here): every document is tokenised, an end-of-text token is
appended, the token streams of one participant are concatenated and cut into blocks of
``block_size``. Unlike ``run_clm`` the last, shorter block is kept (padded, and masked out of the
loss), so a small owner with less than one block of text still trains. Blocks never span two
participants, so no text crosses an owner boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.placement import placement_of

IGNORE = -100  # label of positions that are not predicted (padding); the value transformers uses


@dataclass
class Blocks:
    """Packed token blocks: ``input_ids`` [N, L] (right-padded with ``pad_id``) and real ``lengths`` [N]."""

    input_ids: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> "Blocks":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Blocks(self.input_ids[idx], self.lengths[idx])

    @staticmethod
    def cat(parts: list["Blocks"]) -> "Blocks":
        return Blocks(torch.cat([p.input_ids for p in parts]), torch.cat([p.lengths for p in parts]))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def pack_ids(docs: list[list[int]], block_size: int, eos_id: int, pad_id: int) -> Blocks:
    """Concatenate token lists (each followed by ``eos_id``) and cut them into ``block_size`` blocks."""
    stream = [t for d in docs for t in (*d, eos_id)]
    n = math.ceil(len(stream) / block_size)
    ids = torch.full((n, block_size), pad_id, dtype=torch.long)
    if n:
        flat = torch.tensor(stream, dtype=torch.long)
        ids.view(-1)[: len(stream)] = flat
    lengths = torch.full((n,), block_size, dtype=torch.long)
    if n and len(stream) % block_size:
        lengths[-1] = len(stream) % block_size
    return Blocks(ids, lengths)


def pack(tokenizer, texts: list[str], block_size: int) -> Blocks:
    """Tokenise ``texts`` (no special tokens) and pack them; EOS separates documents."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return pack_ids(ids, block_size, eos, pad)


class CausalLMTask:
    """Batches, loss and metrics (token loss, perplexity, next-token accuracy) for ``*ForCausalLM`` models."""

    record_metrics: tuple[str, ...] = ("perplexity",)  # what a round record shows beside loss and accuracy

    @staticmethod
    def batch(data: Blocks, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths = data.lengths[idx]
        width = int(lengths.max())
        ids = data.input_ids[idx, :width]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}

    @staticmethod
    def loss_terms(batch: dict[str, torch.Tensor]) -> int:
        """How many tokens the batch's mean loss averages (each predicted from the one before it)."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model: torch.nn.Module, data: Blocks, batch_size: int = 32) -> dict[str, float]:
        """Token-level mean negative log-likelihood, its exp (perplexity) and next-token accuracy."""
        was_training = model.training
        model.eval()
        nll, correct, count = 0.0, 0, 0
        where = placement_of(model)
        with torch.inference_mode():
            for idx in torch.arange(len(data)).split(batch_size) if len(data) else ():  # split(0 items) yields one empty batch
                b = where.move(self.batch(data, idx))
                with where.autocast():
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                target = b["labels"][:, 1:]
                nll += float(F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"))
                keep = target != IGNORE
                correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
                count += int(keep.sum())
        model.train(was_training)
        if count == 0:
            return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan")}
        loss = nll / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count}
