"""Instruction tuning of a chat model: the model's chat template, loss on the response only, and
evaluation by held-out response loss / perplexity and by generating answers (ROUGE-L, exact match).

Each example is rendered with the tokenizer's own chat template (``apply_chat_template``) as a user
turn and an assistant turn; the prompt is the same conversation rendered up to the assistant header
(``add_generation_prompt=True``). Tokens of the prompt get label -100, so the loss and every metric
count response tokens only (the reply, its end-of-turn token and the template's closing newline).
Soft-prompt methods (prompt, prefix, P-tuning) need nothing more: peft prepends the virtual tokens
and masks their labels itself.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.errors import DataError
from fedfm.placement import placement_of

IGNORE = -100


@dataclass
class Dialogs:
    """Tokenised (instruction, response) pairs: ``input_ids`` [N, L] right-padded, real ``lengths`` [N],
    ``prompt_lengths`` [N] (tokens before the response), and the raw prompt and reference texts for generation."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    prompts: list[str]
    references: list[str]
    instructions: list[str]
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx) -> "Dialogs":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        t = torch.as_tensor(idx, dtype=torch.long)
        return Dialogs(
            self.input_ids[t], self.lengths[t], self.prompt_lengths[t],
            [self.prompts[i] for i in idx], [self.references[i] for i in idx], [self.instructions[i] for i in idx],
            self.pad_id,
        )

    @staticmethod
    def cat(parts: list["Dialogs"]) -> "Dialogs":
        width = max(int(p.input_ids.shape[1]) for p in parts)
        ids = [F.pad(p.input_ids, (0, width - p.input_ids.shape[1]), value=parts[0].pad_id) for p in parts]
        return Dialogs(
            torch.cat(ids), torch.cat([p.lengths for p in parts]), torch.cat([p.prompt_lengths for p in parts]),
            [x for p in parts for x in p.prompts], [x for p in parts for x in p.references],
            [x for p in parts for x in p.instructions], parts[0].pad_id,
        )


def render(tokenizer, instruction: str, response: str | None = None, system: str | None = None) -> str:
    """The chat-template text of one exchange; without ``response``, the prompt a reply is generated from.
    ``system`` is the system turn (None: whatever the template adds by default)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": instruction}]
    if response is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)


def encode_dialogs(tokenizer, instructions: list[str], responses: list[str], max_length: int, system: str | None = None) -> Dialogs:
    """Tokenise every pair once. A response is cut to fit ``max_length``; a prompt that leaves no room for
    a response token is a :class:`DataError` naming the example."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [render(tokenizer, q, system=system) for q in instructions]
    fulls = [render(tokenizer, q, r, system) for q, r in zip(instructions, responses)]
    if not prompts:
        empty = torch.zeros(0, dtype=torch.long)
        return Dialogs(torch.full((0, 1), pad, dtype=torch.long), empty, empty, [], [], [], pad)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    rows, lengths, plens = [], [], []
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if not fulls[i].startswith(prompts[i]) or f[: len(p)] != p:
            # the template or the tokenizer merges across the prompt/response boundary: masking by
            # prompt length would then be wrong, so refuse rather than train on a misaligned mask
            raise DataError(f"example {i}: the chat template's prompt is not a token prefix of the full exchange")
        if len(p) >= max_length:
            raise DataError(
                f"example {i}: the prompt is {len(p)} tokens, leaving no room for a response within "
                f"data.max_length={max_length}; raise data.max_length"
            )
        rows.append(f[:max_length])
        lengths.append(min(len(f), max_length))
        plens.append(len(p))
    width = max(lengths)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Dialogs(ids, torch.tensor(lengths), torch.tensor(plens), prompts, list(responses), list(instructions), pad)


_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces (SQuAD-style answer normalisation)."""
    return " ".join(text.lower().translate(_PUNCT).split())


class InstructionTask:
    """Batches, response-only loss and metrics for chat models (``*ForCausalLM``, optionally peft-wrapped)."""

    record_metrics: tuple[str, ...] = ("perplexity", "rougeL", "exact_match")  # beside loss and accuracy

    def __init__(self, tokenizer, generate: int = 32, max_new_tokens: int = 48):
        from rouge_score import rouge_scorer

        self.tokenizer = tokenizer
        self.generate_n = generate
        self.max_new_tokens = max_new_tokens
        # the reference ROUGE implementation (Google's rouge-score, as used by HF evaluate); Porter stemming
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        self.stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id

    @staticmethod
    def batch(data: Dialogs, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths, plens = data.lengths[idx], data.prompt_lengths[idx]
        width = int(lengths.max())
        ids = data.input_ids[idx, :width]
        pos = torch.arange(width)[None, :]
        mask = (pos < lengths[:, None]).long()
        labels = ids.masked_fill((pos < plens[:, None]) | (mask == 0), IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def loss_terms(batch: dict[str, torch.Tensor]) -> int:
        """How many response tokens the batch's mean loss averages (each predicted from the one before it)."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model: torch.nn.Module, data: Dialogs, batch_size: int = 32) -> dict[str, float]:
        """Response-token loss, perplexity and next-token accuracy; ROUGE-L F1 and exact match of greedy answers
        to the first ``generate`` examples."""
        was_training = model.training
        model.eval()
        nll, correct, count = 0.0, 0, 0
        where = placement_of(model)
        with torch.inference_mode():
            for idx in torch.arange(len(data)).split(batch_size) if len(data) else ():
                b = where.move(self.batch(data, idx))
                with where.autocast():
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                logits = logits[:, -b["input_ids"].shape[1]:]  # prompt tuning prepends virtual-token positions
                logits, target = logits[:, :-1], b["labels"][:, 1:]
                nll += float(F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"))
                keep = target != IGNORE
                correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
                count += int(keep.sum())
        out = {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan")}
        if count:
            loss = nll / count
            out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count}
        n = min(self.generate_n, len(data))
        if n:
            answers = self.answer(model, data.prompts[:n], batch_size)
            scores = [self.score(a, r) for a, r in zip(answers, data.references[:n])]
            out["rougeL"] = float(np.mean([s["rougeL"] for s in scores]))
            out["exact_match"] = float(np.mean([s["exact_match"] for s in scores]))
        model.train(was_training)
        return out

    def score(self, answer: str, reference: str) -> dict[str, float]:
        return {
            "rougeL": self.scorer.score(reference, answer)["rougeL"].fmeasure,
            "exact_match": float(normalise(answer) == normalise(reference)),
        }

    def answer(self, model: torch.nn.Module, prompts: list[str], batch_size: int = 16) -> list[str]:
        """Greedy answers to chat-template prompts (left-padded batches; stops at the end-of-turn token)."""
        was_training = model.training
        model.eval()
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        answers: list[str] = []
        try:
            where = placement_of(model)
            with torch.inference_mode(), where.autocast():
                for start in range(0, len(prompts), batch_size):
                    enc = tok(prompts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
                    enc = where.move({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
                    out = model.generate(
                        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=self.max_new_tokens,
                        do_sample=False, eos_token_id=self.stop_id, pad_token_id=tok.pad_token_id,
                    )
                    new = out[:, enc["input_ids"].shape[1]:].cpu()
                    answers += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
        finally:
            tok.padding_side = side
            model.train(was_training)
        return answers

    def samples(self, model: torch.nn.Module, data: Dialogs, n: int) -> list[dict]:
        """The first ``n`` examples with their reference and the model's answer (shown in the run report)."""
        n = min(n, len(data))
        answers = self.answer(model, data.prompts[:n])
        return [
            {"instruction": q, "reference": r, "answer": a, **self.score(a, r)}
            for q, r, a in zip(data.instructions[:n], data.references[:n], answers)
        ]

