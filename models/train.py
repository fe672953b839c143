"""Training: the SASRec recipe (next item at every position, softmax over the whole catalog) + a re-ranker.

Retrieval: the causal state at every position of a window scores every training item by dot product and
is trained with softmax cross-entropy over the whole catalog (Klenitskiy & Vasilev, RecSys 2023: this,
not the architecture, is what makes SASRec strong), less the items the user had before the target
(``exclude_seen``). Above ``full_softmax_max_items`` the softmax is sampled instead: many negatives drawn
by popularity^0.75, with the logQ correction.

Re-ranking (``rerank``, off by default: it ranked below retrieval on validation): at a few positions per
window, a softmax of the full logit (target attention + MLP on top of the dot product) over a shortlist
(the positive, negatives drawn from the retrieval top ``rerank_size``, a few uniform ones), with the
residual (full logit − dot product) pulled towards 0 so re-ranked items stay on the scale of the
retrieval scores of every other item, over which serving normalises.

Prior: the history-free logits of every item, softmax over the catalog against each window's first event.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.evaluate import Case, evaluate_cases
from models.ranker import HistoryTensors, ItemTower, RankerConfig, SequenceRanker
from models.sequences import UserSequence, Windows, history_arrays, make_windows, span_indices

MASKED = -1e4
"""Logit of an item that is not a valid answer (padding of the catalog, items without training data)."""


MEMBER_SEED_STEP = 100
"""Member k of an ensemble fits with ``seed + MEMBER_SEED_STEP · k``."""
SASREC_DROPOUT = 0.5
"""RecBole's default SASRec dropout, kept by the ID-only baseline that reproduces that recipe."""


@dataclass(frozen=True)
class FitConfig:
    dim: int = 128
    """Width of every item vector and user state, split evenly over ``members`` (64 each by default)."""
    members: int = 2
    """Independently fitted models (``member``: the recipe with seed + 100·k), joined into one model whose
    score is the sum of theirs (``models.ensemble``). Two: on validation users held out from the epoch
    choice, +3.5 % NDCG@10 over one model, on every seed (README, ablations)."""
    history_length: int = 50
    heads: int = 2
    layers: int = 2
    recency_bias: bool = True
    """A learned attention bias per head and query-key distance (``models.ranker.CausalBlock``). Chosen
    on validation (seeds 0, 1, 2; README, ablations); the ID-only baseline keeps SASRec's absolute
    positions alone."""
    dropout: float = 0.3
    """Chosen on validation (seed 0): 0.3 gave NDCG@10 0.1512 against 0.1384 at 0.5 (README, ablations)."""
    id_dropout: float = 0.1
    epochs: int = 60
    batch_size: int = 64
    stride: int = 10
    min_context: int | None = None
    """Train on a target only when its window holds at least this many events before it (the user's first
    window excepted), see ``models.sequences.make_windows``. None: ``history_length + 1 - stride``, so each
    event is a target once, read with at least 41 events before it at the defaults (as RecBole's SASRec
    reads each target's last 50); 0: every slot of every window, an event in several windows."""
    exclude_seen: bool = True
    """The user's earlier items are not answers in the training softmax, as evaluation and
    ``/v1/recommend`` never rank them (False: every catalog item competes at every position, SASRec).
    Chosen on validation (seed 0): NDCG@10 0.1661 against 0.1512 (the window's inputs alone: 0.1557).
    The ID-only baseline keeps SASRec's unmasked softmax (README, ablations)."""
    full_softmax_max_items: int = 50_000
    """Whole-catalog softmax up to this many items; a sampled softmax with logQ correction above."""
    sampled_negatives: int = 4096
    event_features: bool = True
    """Read each event's type, value (rating) and time gap beside its item (False: items only, SASRec)."""
    rerank: bool = False
    """Train and use the target-attention re-ranker (False: retrieval scores only, SASRec)."""
    rerank_positions: int = 2
    rerank_hard: int = 32
    rerank_uniform: int = 8
    rerank_size: int = 200
    """Evaluation: the top this-many retrieval items are re-scored by the full logit."""
    residual_weight: float = 0.01
    """Pull of the re-ranker's residual (full logit − dot product) towards 0."""
    lr: float = 2e-3
    min_lr_fraction: float = 0.05
    """Cosine decay of the learning rate over ``epochs`` down to this fraction of ``lr`` (1.0: constant)."""
    weight_decay: float = 0.0
    prior_weight: float = 0.1
    patience: int = 10
    min_epochs: int = 60
    """No early stop before this epoch (the default: none; the best validation epoch is kept)."""
    valid_users: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.ranker_config()  # its checks, before any fit

    def ranker_config(self) -> RankerConfig:
        """The shape of the head this recipe trains (the joined one for an ensemble)."""
        return RankerConfig(
            self.dim,
            self.history_length,
            self.heads,
            self.layers,
            self.dropout,
            rerank=self.rerank,
            event_features=self.event_features,
            recency_bias=self.recency_bias,
            members=self.members,
        )

    def windows(self, sequences: list[UserSequence]) -> Windows:
        """The training windows of ``sequences`` under this recipe."""
        min_context = self.history_length + 1 - self.stride if self.min_context is None else self.min_context
        return make_windows(sequences, self.history_length, self.stride, min_context)

    def member(self, k: int) -> FitConfig:
        """The recipe of member ``k``: one model, its own seed (initialisation, batch order, dropout)."""
        return dataclasses.replace(
            self, dim=self.dim // self.members, members=1, seed=self.seed + MEMBER_SEED_STEP * k
        )

    def baseline(self) -> FitConfig:
        """The ID-only baseline's recipe: the same training on items alone, retrieval scores only, with
        SASRec's (RecBole's default) dropout and softmax over every item (the user's earlier ones too)."""
        return dataclasses.replace(
            self,
            dim=self.dim // self.members,
            members=1,
            rerank=False,
            event_features=False,
            recency_bias=False,
            dropout=SASREC_DROPOUT,
            exclude_seen=False,
        )


class RecModel(nn.Module):
    """Item tower + sequence head, trained together (``members`` > 1: an ensemble's joined members, which
    are trained apart, see ``models.ensemble``)."""

    def __init__(self, num_items: int, text_features: torch.Tensor | None, cfg: FitConfig) -> None:
        super().__init__()
        self.tower = ItemTower(num_items, cfg.dim, text_features, cfg.id_dropout, cfg.members)
        self.ranker = SequenceRanker(cfg.ranker_config())
        self.history_length = cfg.history_length
        self.rerank_size = cfg.rerank_size if cfg.rerank else 0

    def _inputs(self, histories: Sequence[UserSequence], vectors: torch.Tensor) -> HistoryTensors:
        arrays = [history_arrays(h, self.history_length) for h in histories]
        items, types, values, gaps, mask = (
            torch.from_numpy(np.stack(col)) for col in zip(*arrays, strict=True)
        )
        return HistoryTensors(vectors[items] * mask.unsqueeze(-1), types, values, gaps, mask)

    @torch.no_grad()
    def _scored(
        self, histories: Sequence[UserSequence], item_vectors: torch.Tensor | None, rerank_size: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(served scores, retrieval scores, the re-ranked shortlist's columns or None), see ``scores``."""
        vectors = self.tower() if item_vectors is None else item_vectors
        k = self.rerank_size if rerank_size is None else rerank_size
        history = self._inputs(histories, vectors)
        if k <= 0:
            retrieval = self.ranker.user_state(history) @ vectors.T
            return retrieval.numpy(), retrieval.numpy(), None
        states = self.ranker.encode(history)
        user = states[:, -1, :]
        retrieval = user @ vectors.T
        top = retrieval.topk(min(k, retrieval.shape[1]), dim=1).indices
        context, _ = self.ranker.target_attention(states, history.mask.unsqueeze(1), vectors[top])
        full = self.ranker.score(user.unsqueeze(1), context, vectors[top])
        return retrieval.scatter(1, top, full).numpy(), retrieval.numpy(), top.numpy()

    def scores(
        self,
        histories: Sequence[UserSequence],
        item_vectors: torch.Tensor | None = None,
        rerank_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(served scores, retrieval scores) of every catalog item for each history: two [n, N] arrays.

        Retrieval: user state · item vector. Served: the same, with the top ``rerank_size`` (default: the
        model's; 0 for none) re-scored by the full logit, as ``/v1/recommend`` ranks."""
        served, retrieval, _ = self._scored(histories, item_vectors, rerank_size)
        return served, retrieval

    def score_all(
        self,
        histories: Sequence[UserSequence],
        item_vectors: torch.Tensor | None = None,
        rerank_size: int | None = None,
    ) -> np.ndarray:
        """Ranking scores of every catalog item for each history: [n, N], ordered as ``/v1/recommend``
        orders them: the re-ranked shortlist by its full logits, above every other item by retrieval score.
        """
        served, retrieval, top = self._scored(histories, item_vectors, rerank_size)
        if top is None:
            return served
        shortlist = np.take_along_axis(served, top, 1)
        floor = retrieval.max(1, keepdims=True) + 1.0
        ranked = retrieval.copy()
        np.put_along_axis(ranked, top, shortlist - shortlist.min(1, keepdims=True) + floor, 1)
        return ranked


@dataclass(frozen=True)
class FitData:
    """What a fit learns from: the training windows, the validation cases (none: a final fit on all data,
    for a fixed number of epochs), the items with a training event (the only softmax targets), the
    catalog size, and the items' text features (None: IDs only)."""

    windows: Windows
    valid: list[Case]
    train_items: np.ndarray
    num_items: int
    text_features: torch.Tensor | None


@dataclass
class FitResult:
    model: RecModel
    config: FitConfig
    """The recipe that produced ``model`` (of this fit; a warm start's earlier fit has its own)."""
    curve: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    members: list[FitResult] = field(default_factory=list)
    """An ensemble's fits, one per member (``model`` joins them; ``curve`` and ``best_epoch`` stay empty);
    empty for one model."""

    def parts(self) -> list[FitResult]:
        """The fits this result is made of: its members, or itself."""
        return self.members or [self]


class _Softmax:
    """The catalog-wide softmax of one fit: full where affordable, sampled with logQ correction above."""

    def __init__(self, train_items: np.ndarray, counts: np.ndarray, num_items: int, cfg: FitConfig) -> None:
        self.full = len(train_items) <= cfg.full_softmax_max_items
        self.bias = torch.full((num_items,), MASKED)
        self.bias[torch.from_numpy(train_items)] = 0.0
        q = np.zeros(num_items)
        q[train_items] = np.maximum(counts[train_items], 1.0) ** 0.75
        self.q = torch.from_numpy(q / q.sum()).float()
        self.k = cfg.sampled_negatives

    def logits(self, queries: torch.Tensor, vectors: torch.Tensor, targets: torch.Tensor):
        """(logits [M, C], column of each target [M], candidate ids [C] or None for the whole catalog)."""
        if self.full:
            return queries @ vectors.T + self.bias, targets, None
        neg = torch.multinomial(self.q, self.k, replacement=True)
        ids = torch.cat([targets, neg])
        logq = torch.log(self.q[ids] * self.k)
        logits = queries @ vectors[ids].T - logq
        # An in-batch target that equals another row's target is a hit, not a negative, for that row.
        same = ids.unsqueeze(0) == targets.unsqueeze(1)
        own = torch.arange(len(targets))
        same[own, own] = False
        return logits.masked_fill(same, MASKED), own, ids


def _seen_pairs(batch: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, item) pairs for the M trained positions (``valid``, row-major): the items the user had before
    position m's target, those before its window (``earlier_*``) and the window's inputs up to m."""
    windows, positions = valid.nonzero(as_tuple=True)
    slots = torch.arange(valid.shape[1])
    read = (slots.unsqueeze(0) <= positions.unsqueeze(1)) & (batch["mask"][windows] > 0)
    in_window_rows, in_window_slots = read.nonzero(as_tuple=True)
    in_window_items = batch["items"][windows[in_window_rows], in_window_slots]
    # The earlier items are grouped by window (``Windows.earlier_items``): each position takes its window's.
    per_window = torch.bincount(batch["earlier_rows"], minlength=valid.shape[0])
    offsets = torch.cumsum(per_window, 0) - per_window
    lengths = per_window[windows]
    earlier_items = batch["earlier_items"][span_indices(offsets[windows].numpy(), lengths.numpy())]
    rows = torch.cat([in_window_rows, torch.repeat_interleave(torch.arange(len(windows)), lengths)])
    return rows, torch.cat([in_window_items, earlier_items])


def _without_seen(
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    seen: tuple[torch.Tensor, torch.Tensor],
    num_items: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax logits with each row's seen items masked (the row's target never)."""
    logits, target_cols, ids = out
    rows, items = seen
    if ids is None:  # the whole catalog: one column per item
        masked = torch.zeros_like(logits, dtype=torch.bool)
        masked[rows, items] = True
    else:  # sampled columns: look each (row, column item) pair up among the seen pairs
        columns = torch.arange(len(logits)).unsqueeze(1) * num_items + ids.unsqueeze(0)
        masked = torch.isin(columns, rows * num_items + items)
    masked[torch.arange(len(target_cols)), target_cols] = False
    return logits.masked_fill(masked, MASKED), target_cols, ids


def _batch_loss(model: RecModel, batch: dict[str, torch.Tensor], cfg: FitConfig, softmax: _Softmax):
    vectors = model.tower()
    mask = batch["mask"]
    hv = vectors[batch["items"]] * mask.unsqueeze(-1)
    states = model.ranker.encode(HistoryTensors(hv, batch["types"], batch["values"], batch["gaps"], mask))
    targets = batch["targets"]
    valid = targets >= 0
    out = softmax.logits(states[valid], vectors, targets[valid])
    if cfg.exclude_seen:
        out = _without_seen(out, _seen_pairs(batch, valid), len(vectors))
    loss = nn.functional.cross_entropy(out[0], out[1])
    if cfg.rerank:
        loss = loss + _rerank_loss(model, states, mask, targets, vectors, out, valid, cfg)
    # History-free prior over the whole catalog, against each window's first event.
    first = batch["items"].gather(1, mask.argmax(dim=1, keepdim=True)).squeeze(1)
    prior = model.ranker.prior_logits(vectors.unsqueeze(0)).squeeze(0) + softmax.bias
    prior_loss = nn.functional.cross_entropy(prior.unsqueeze(0).expand(len(first), -1), first)
    return loss + cfg.prior_weight * prior_loss


def _rerank_loss(
    model: RecModel,
    states: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    vectors: torch.Tensor,
    softmax_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    valid: torch.Tensor,
    cfg: FitConfig,
) -> torch.Tensor:
    """Softmax of the full logits over a shortlist at P positions per window: the positive, negatives
    drawn from the retrieval top ``rerank_size`` (what the re-ranker sees in serving) and a few uniform ones.

    The residual (full logit minus the dot product) is pulled towards 0, so re-ranked items stay on the
    scale of the retrieval scores of every other item (serving normalises over both)."""
    logits, target_cols, ids = softmax_out
    b, length = targets.shape
    pick = torch.rand(targets.shape).masked_fill(~valid, -1.0)
    pick[:, -1] = torch.where(valid[:, -1], 2.0, -1.0)
    positions = pick.topk(min(cfg.rerank_positions, length), dim=1).indices  # [B, P]
    chosen = valid.gather(1, positions)  # [B, P]
    row_of = torch.full((b, length), -1, dtype=torch.long)
    row_of[valid] = torch.arange(int(valid.sum()))
    rows = row_of.gather(1, positions).clamp(min=0)  # [B, P]
    base = logits.detach()[rows]  # [B, P, C]
    cols = target_cols[rows]  # [B, P]
    # Negatives drawn from the retrieval top ``rerank_size``: the distribution serving re-ranks.
    top = (
        base.scatter(2, cols.unsqueeze(-1), MASKED)
        .topk(min(cfg.rerank_size, base.shape[2] - 1), dim=2)
        .indices
    )
    hard = top.gather(2, torch.randint(top.shape[2], (b, positions.shape[1], cfg.rerank_hard)))
    uniform = torch.randint(base.shape[2], (b, positions.shape[1], cfg.rerank_uniform))
    shortlist = torch.cat([cols.unsqueeze(-1), hard, uniform], 2)  # [B, P, S] columns of base
    items = shortlist if ids is None else ids[shortlist]
    cand = vectors[items]
    full = model.ranker.sequence_logits(states, mask, positions, cand)
    dot = (model.ranker.gather_states(states, positions).unsqueeze(2) * cand).sum(-1)
    # A negative that is the positive itself (a uniform draw) or not a valid answer does not compete.
    excluded = (items == items[..., :1]) | (base.gather(2, shortlist) <= MASKED / 2)
    excluded[..., 0] = False
    ce = nn.functional.cross_entropy(
        full.masked_fill(excluded, MASKED)[chosen], torch.zeros_like(cols[chosen])
    )
    return ce + cfg.residual_weight * (full - dot)[chosen].pow(2).mean()


def _lr_factor(step: int, total_steps: int, cfg: FitConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: cosine from 1 down to ``min_lr_fraction`` at the last step."""
    progress = min(step / max(total_steps, 1), 1.0)
    return cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(name: str, data: FitData, cfg: FitConfig, init: RecModel | None = None) -> FitResult:
    """Train with early stopping on validation NDCG@10; returns the best model (eval mode).

    Without validation cases it trains ``cfg.epochs`` epochs and keeps the last state. ``init`` warm-starts
    from a trained model (its weights are copied, not changed). One model: an ensemble's members are fitted
    apart (``models.ensemble.fit_members``).
    """
    if cfg.members != 1:
        raise ValueError(f"fit trains one model, not {cfg.members}: see models.ensemble.fit_members")
    windows, valid, train_items, num_items = data.windows, data.valid, data.train_items, data.num_items
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = copy.deepcopy(init) if init is not None else RecModel(num_items, data.text_features, cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tensors = {
        k: torch.from_numpy(getattr(windows, k))
        for k in ("items", "types", "values", "gaps", "mask", "targets")
    }
    counts = np.bincount(windows.targets[windows.targets >= 0], minlength=num_items).astype(np.float64)
    softmax = _Softmax(train_items, counts, num_items, cfg)
    picks = rng.choice(len(valid), min(cfg.valid_users, len(valid)), replace=False) if valid else []
    valid_sample = [valid[i] for i in np.sort(picks)]
    result = FitResult(model, cfg)
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
            batch = {k: v[idx] for k, v in tensors.items()}
            if cfg.exclude_seen:
                earlier = windows.earlier_items(idx.numpy())
                batch["earlier_rows"], batch["earlier_items"] = map(torch.from_numpy, earlier)
            loss = _batch_loss(model, batch, cfg, softmax)
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
