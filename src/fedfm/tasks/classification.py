"""Sequence classification: pre-tokenised tensors, cross-entropy loss, accuracy and macro-F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedfm.placement import placement_of


@dataclass
class Encoded:
    """A tokenised text classification set: padded to ``max_length`` once, trimmed per batch."""

    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> "Encoded":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Encoded(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        return Encoded(
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.attention_mask for p in parts]),
            torch.cat([p.labels for p in parts]),
        )


def encode(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    """Tokenise every text once up front, so rounds never pay for tokenisation again."""
    if not len(texts):  # a Flower coordinator without a test set holds no examples (HF tokenizers fail on [])
        none = torch.zeros((0, max_length), dtype=torch.long)
        return Encoded(none, none.clone(), torch.zeros(0, dtype=torch.long))
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long))


class ClassificationTask:
    """Batches, loss and metrics for sequence classification (any HF ``*ForSequenceClassification``)."""

    record_metrics: tuple[str, ...] = ()  # what a round record shows beside loss, accuracy and macro F1

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    @staticmethod
    def batch(data: Encoded, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = data.attention_mask[idx]
        # dynamic padding: drop the columns that are padding for every row of this batch
        width = int(mask.sum(1).max())
        return {"input_ids": data.input_ids[idx, :width], "attention_mask": mask[:, :width], "labels": data.labels[idx]}

    @staticmethod
    def loss_terms(batch: dict[str, torch.Tensor]) -> int:
        """How many terms the batch's mean loss averages (its examples): micro-batches are weighted by it."""
        return int(batch["labels"].shape[0])

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], logit_offset: torch.Tensor | None = None) -> torch.Tensor:
        if logit_offset is None:
            return model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits + logit_offset, batch["labels"])

    def logit_offset(self, client_labels: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
        """log p_client(y) - log p_global(y), both add-one smoothed (a class a client lacks gets a large
        negative offset, so the client is not pushed to suppress it)."""
        local = torch.bincount(client_labels, minlength=self.num_labels).double() + 1
        glob = global_counts.double() + 1
        return (local / local.sum()).log().float() - (glob / glob.sum()).log().float()

    def evaluate(self, model: torch.nn.Module, data: Encoded, batch_size: int = 128) -> dict[str, float]:
        """Mean cross-entropy, accuracy and macro-F1 of ``model`` on ``data``."""
        was_training = model.training
        model.eval()
        loss_sum, preds = 0.0, []
        where = placement_of(model)
        with torch.inference_mode():
            for idx in torch.arange(len(data)).split(batch_size) if len(data) else ():  # split(0 items) yields one empty batch
                b = where.move(self.batch(data, idx))
                with where.autocast():
                    out = model(**b)
                loss_sum += float(out.loss) * len(idx)
                preds.append(out.logits.argmax(-1).cpu())
        model.train(was_training)
        pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
        return {"loss": loss_sum / max(len(data), 1), **classification_metrics(pred, data.labels, self.num_labels)}


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (classes absent from both pred and target are skipped,
    as scikit-learn's ``f1_score(average='macro', labels=present)`` does)."""
    if len(target) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    cm = torch.bincount(target * num_labels + pred, minlength=num_labels**2).reshape(num_labels, num_labels)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp(min=1), torch.zeros_like(tp))
    return {"accuracy": float(tp.sum() / len(target)), "macro_f1": float(f1[present].mean())}
