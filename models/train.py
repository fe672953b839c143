"""Training: next-item objective over time-ordered windows with sampled negatives.

Loss at every position t of a window: softmax cross-entropy of the next item against K shared
uniformly-sampled negatives (what full ranking rewards), plus a binary cross-entropy term on the same
logits so that sigmoid(logit) behaves as a click probability, plus the same on an empty history
(the first event of each window) so the history-free prior is trained too.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.evaluate import Case, evaluate_cases
from models.ranker import ItemTower, SequenceRanker
from models.sequences import UserSequence, Windows, history_arrays


@dataclass(frozen=True)
class FitConfig:
    dim: int = 64
    history_length: int = 50
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2
    id_dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 128
    negatives: int = 256
    rank_negatives: int = 32
    positions: int = 8
    lr: float = 3e-3
    min_lr_fraction: float = 0.05
    """Cosine decay of the learning rate over ``epochs`` down to this fraction of ``lr`` (1.0: constant)."""
    weight_decay: float = 1e-4
    bce_weight: float = 0.3
    prior_weight: float = 0.1
    stride: int = 25
    patience: int = 8
    min_epochs: int = 20
    """No early stop before this epoch: validation NDCG@10 is noisy while the learning rate is high."""
    valid_users: int = 1000
    seed: int = 0


class RecModel(nn.Module):
    """Item tower + sequence head, trained together."""

    def __init__(self, num_items: int, text_features: torch.Tensor | None, cfg: FitConfig) -> None:
        super().__init__()
        self.tower = ItemTower(num_items, cfg.dim, text_features, cfg.id_dropout)
        self.ranker = SequenceRanker(cfg.dim, cfg.history_length, cfg.heads, cfg.layers, cfg.dropout)
        self.history_length = cfg.history_length

    @torch.no_grad()
    def score_all(
        self, histories: Sequence[UserSequence], item_vectors: torch.Tensor | None = None
    ) -> np.ndarray:
        """Scores of every catalog item for each history: [n, N] (eval mode)."""
        vectors = self.tower() if item_vectors is None else item_vectors
        arrays = [history_arrays(h, self.history_length) for h in histories]
        items, types, values, gaps, mask = (
            torch.from_numpy(np.stack(col)) for col in zip(*arrays, strict=True)
        )
        hv = vectors[items] * mask.unsqueeze(-1)
        cands = vectors.unsqueeze(0).expand(len(histories), -1, -1)
        logits, _, _ = self.ranker(hv, types, values, gaps, mask, cands)
        return logits.numpy()


@dataclass
class FitResult:
    model: RecModel
    curve: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def _softmax_and_bce(logits: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    """Per-row loss of [..., 1 + K] logits whose column 0 is the positive."""
    ce = -torch.log_softmax(logits, -1)[..., 0]
    bce = nn.functional.softplus(-logits[..., 0]) + nn.functional.softplus(logits[..., 1:]).mean(-1)
    return ce + cfg.bce_weight * bce


def _batch_loss(model: RecModel, batch: dict[str, torch.Tensor], cfg: FitConfig, train_items: torch.Tensor):
    """Two views of the same next-item objective at P sampled positions per window.

    Retrieval: the user state's dot product against the positive and K shared negatives (cheap, so K is
    large; this is what ``/v1/recommend`` retrieves with). Ranking: the full logit (target attention +
    MLP) against the first ``rank_negatives`` of them, softmax + BCE so sigmoid(logit) is a probability.
    Positions are sampled (the newest always among them) because the full head costs per (position,
    candidate) pair.
    """
    vectors = model.tower()
    mask = batch["mask"]
    hv = vectors[batch["items"]] * mask.unsqueeze(-1)
    states = model.ranker.encode(hv, batch["types"], batch["values"], batch["gaps"], mask)
    targets = batch["targets"]
    pick = torch.rand(targets.shape).masked_fill(targets < 0, -1.0)
    pick[:, -1] = torch.where(targets[:, -1] >= 0, 2.0, -1.0)
    positions = pick.topk(min(cfg.positions, targets.shape[1]), dim=1).indices
    targets = targets.gather(1, positions)
    valid = (targets >= 0).float()
    neg_ids = train_items[torch.randint(len(train_items), (cfg.negatives,))]
    collide = neg_ids.view(1, 1, -1) == targets.unsqueeze(-1)  # [B, P, K]
    pos_vec, neg_vec = vectors[targets.clamp(min=0)], vectors[neg_ids]

    queries = model.ranker.gather_states(states, positions)
    dot = torch.cat([(queries * pos_vec).sum(-1, keepdim=True), queries @ neg_vec.T], -1)
    dot = torch.cat([dot[..., :1], dot[..., 1:].masked_fill(collide, -1e4)], -1)

    k = cfg.rank_negatives
    cands = torch.cat([pos_vec.unsqueeze(2), neg_vec[:k].expand(*positions.shape, k, -1)], 2)
    full = model.ranker.sequence_logits(states, mask, positions, cands)
    full = torch.cat([full[..., :1], full[..., 1:].masked_fill(collide[..., :k], -1e4)], -1)
    per_case = -torch.log_softmax(dot, -1)[..., 0] + _softmax_and_bce(full, cfg)
    loss = (per_case * valid).sum() / valid.sum().clamp(min=1)

    # History-free prior: each window's first event, predicted from nothing.
    first = batch["items"].gather(1, mask.argmax(dim=1, keepdim=True)).squeeze(1)
    prior_cands = torch.cat([vectors[first].unsqueeze(1), neg_vec[:k].expand(len(first), -1, -1)], 1)
    prior = model.ranker.prior_logits(prior_cands)
    return loss + cfg.prior_weight * _softmax_and_bce(prior, cfg).mean()


def _lr_factor(step: int, total_steps: int, cfg: FitConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: cosine from 1 down to ``min_lr_fraction`` at the last step."""
    progress = min(step / max(total_steps, 1), 1.0)
    return cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(
    name: str,
    windows: Windows,
    valid: list[Case],
    train_items: np.ndarray,
    num_items: int,
    text_features: torch.Tensor | None,
    cfg: FitConfig,
    init: RecModel | None = None,
) -> FitResult:
    """Train with early stopping on validation NDCG@10; returns the best model (eval mode).

    Without validation cases it trains ``cfg.epochs`` epochs and keeps the last state. ``init`` warm-starts
    from a trained model (its weights are copied, not changed).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = copy.deepcopy(init) if init is not None else RecModel(num_items, text_features, cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tensors = {
        k: torch.from_numpy(getattr(windows, k))
        for k in ("items", "types", "values", "gaps", "mask", "targets")
    }
    train_items_t = torch.from_numpy(train_items)
    picks = rng.choice(len(valid), min(cfg.valid_users, len(valid)), replace=False) if valid else []
    valid_sample = [valid[i] for i in np.sort(picks)]
    result = FitResult(model)
    best, best_state, stale = -1.0, None, 0
    start = time.perf_counter()
    steps = (len(windows) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = steps * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: _lr_factor(step, total_steps, cfg))
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {name}", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.from_numpy(rng.permutation(len(windows)))
        total = 0.0
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            loss = _batch_loss(model, {k: v[idx] for k, v in tensors.items()}, cfg, train_items_t)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optim.step()
            schedule.step()
            total += loss.item()
        model.eval()
        if not valid:  # a final fit on all data: fixed epochs, keep the last state
            result.curve.append({"epoch": epoch, "loss": total / steps})
            bar.set_postfix(loss=f"{total / steps:.3f}")
            result.best_epoch = epoch
            continue
        with torch.no_grad():
            vectors = model.tower()
            metrics = evaluate_cases(
                lambda h, v=vectors: model.score_all(h, v), valid_sample, train_items, num_items
            )
        result.curve.append(
            {
                "epoch": epoch,
                "loss": total / steps,
                "valid_ndcg10": metrics["NDCG@10"],
                "valid_hr10": metrics["HR@10"],
            }
        )
        bar.set_postfix(loss=f"{total / steps:.3f}", ndcg10=f"{metrics['NDCG@10']:.4f}")
        if metrics["NDCG@10"] > best:
            best, best_state, stale, result.best_epoch = (
                metrics["NDCG@10"],
                copy.deepcopy(model.state_dict()),
                0,
                epoch,
            )
        else:
            stale += 1
            if stale >= cfg.patience and epoch >= cfg.min_epochs:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
