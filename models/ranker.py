"""The sequence head: SASRec-style causal transformer; optionally DIN-style target attention + MLP on top.

It reads item *vectors* (not ids), so an item the model never saw is scored from its text vector the
moment its text is known. ``ItemTower`` makes those vectors during training: text projection plus an
ID embedding with dropout (so the head learns to work without IDs), or IDs only for the baseline.

A candidate's logit is the retrieval score ⟨user state, item vector⟩; with ``rerank`` the target
attention + MLP residual is added (training chooses on validation; off by default). An empty history
gets the history-free prior (the MLP on the candidate alone) either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from models.encoder import StackedProjection, TextProjection
from models.features import NUM_EVENT_TYPES, NUM_GAP_BUCKETS, NUM_VALUE_BUCKETS

NEG_INF = -1e9
SCORE_CLAMP = 30.0
SIMILARITY_TEMPERATURE = 0.1
"""Softmax temperature of the cosine similarities that explain a prediction without the re-ranker."""
SCORE_FEATURES = 5
"""Blocks of the MLP's input (``SequenceRanker.score``): user, context, candidate and two products."""
CANDIDATE_BLOCK = 2
"""The candidate's block among them: the only one that is not zero without a history."""
MLP_HIDDEN = 64
"""Hidden units of the MLP per member."""


class ItemTower(nn.Module):
    """Vectors for every catalog item: text projection (+ ID embedding), or ID embedding only.

    With ``members`` > 1 the tower of an ensemble: slice k of every vector is member k's tower
    (``load_members``)."""

    def __init__(
        self,
        num_items: int,
        dim: int,
        text_features: torch.Tensor | None,
        id_dropout: float,
        members: int = 1,
    ) -> None:
        super().__init__()
        self.use_text = text_features is not None
        self.id_dropout = id_dropout
        self.id_embedding = nn.Embedding(num_items, dim)
        if self.use_text:
            # Zero-init: an item's ID part only grows where its interactions pull it; unseen items keep 0.
            nn.init.zeros_(self.id_embedding.weight)
            self.projection = (
                TextProjection(dim) if members == 1 else StackedProjection(dim // members, members)
            )
            self.register_buffer("text_features", text_features, persistent=False)
        else:
            nn.init.normal_(self.id_embedding.weight, std=0.05)

    @torch.no_grad()
    def load_members(self, towers: list[ItemTower]) -> None:
        """This ensemble tower's weights from its members' one-model towers, in order."""
        self.id_embedding.weight.copy_(torch.cat([t.id_embedding.weight for t in towers], -1))
        if self.use_text:
            for part, tower in zip(self.projection.parts, towers, strict=True):
                part.load_state_dict(tower.projection.state_dict())

    def text_vectors(self) -> torch.Tensor:
        return self.projection(self.text_features)

    def forward(self) -> torch.Tensor:
        ids = self.id_embedding.weight
        if not self.use_text:
            return ids
        if self.training and self.id_dropout > 0:
            keep = (torch.rand(ids.shape[0], 1, device=ids.device) >= self.id_dropout).to(ids.dtype)
            ids = ids * keep
        return self.text_vectors() + ids


def _distances(length: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """[L, L] distance t − j from query slot t back to key slot j, clamped to 0..``max_distance``."""
    slots = torch.arange(length, device=device)
    return (slots.unsqueeze(1) - slots.unsqueeze(0)).clamp(0, max_distance)


class CausalBlock(nn.Module):
    """Pre-LN transformer block with an explicit causal+padding mask (no NaN on empty rows).

    With ``max_len`` > 0, each head adds a learned bias per query-key distance to its attention scores
    (zero at the start, so training begins from plain attention): how far back an event lies is then
    read directly, whatever the history's length, which the absolute positions (counted from the
    window's oldest event) do not give."""

    def __init__(self, dim: int, heads: int, dropout: float, max_len: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.distance_bias = nn.Parameter(torch.zeros(heads, max_len)) if max_len > 0 else None
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, distances: torch.Tensor, newest_only: bool = False
    ) -> torch.Tensor:
        """``allowed`` [B, L, L]: which keys each query reads; ``distances`` [L, L]: ``_distances`` up to
        ``max_len`` − 1, built once per forward pass and shared by every block. ``newest_only``: the
        output of the newest slot alone, [B, 1, D] (its query reads every slot's key and value), which is
        all a user vector needs from the last block."""
        b, length, dim = x.shape
        hd = dim // self.heads
        h = self.ln1(x)
        if newest_only:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = nn.functional.linear(h[:, -1:], weight[:dim], bias[:dim]).reshape(b, 1, self.heads, hd)
            kv = nn.functional.linear(h, weight[dim:], bias[dim:]).reshape(b, length, 2, self.heads, hd)
            q, (k, v) = q.transpose(1, 2), kv.permute(2, 0, 3, 1, 4)
            x, allowed, distances = x[:, -1:], allowed[:, -1:], distances[-1:]
        else:
            q, k, v = self.qkv(h).reshape(b, length, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if self.distance_bias is not None:
            scores = scores + self.distance_bias[:, distances]
        scores = scores.masked_fill(~allowed.unsqueeze(1), NEG_INF)
        att = torch.softmax(scores, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, x.shape[1], dim)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.ffn(self.ln2(x)))


class CausalEncoder(nn.Module):
    """``layers`` causal blocks and a final LayerNorm: one member of a ``SequenceRanker``."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float, max_len: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout, max_len) for _ in range(layers))
        self.final_ln = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, distances: torch.Tensor, newest_only: bool = False
    ) -> torch.Tensor:
        """States [B, L, D], or the newest slot's alone [B, 1, D] (``CausalBlock``)."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, distances, newest_only and i == last)
        return self.final_ln(x)


def _attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries [B, *, C, D] over keys/values [B, L, D] with scores ``scale · q·k``:
    (context, weights).

    Weights are exactly 0 on masked keys and a row with no real key gives a zero context."""
    while keys.dim() < queries.dim():
        keys = keys.unsqueeze(1)
        values = values.unsqueeze(1)
    scores = (queries @ keys.transpose(-1, -2)) * scale
    scores = scores.clamp(-SCORE_CLAMP, SCORE_CLAMP)
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * key_mask
    # clamp, not `+ eps`: the ONNX optimiser folds an added constant below 1e-8 away (0/0 = NaN).
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    return weights @ values, weights


@dataclass(frozen=True)
class RankerConfig:
    """The shape of a ``SequenceRanker``: saved beside its weights, so a loaded ranker is built the same."""

    dim: int
    max_len: int
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2
    rerank: bool = True
    """False: a non-empty history's logit is the retrieval score ⟨user, item⟩ alone (the MLP then only
    serves the history-free prior); chosen at training time on validation."""
    event_features: bool = True
    """False: the events' type, value and time gap are not read (the ID-only SASRec baseline reads items
    and positions only)."""
    recency_bias: bool = False
    """True: every attention head adds a learned bias per query-key distance (``CausalBlock``); False (the
    SASRec baseline, and exports made before it): absolute positions only."""
    members: int = 1
    """Independent causal encoders, member k reading slice k of the ``dim // members`` columns of every
    vector: the user state is their states side by side, so its dot product with an item vector is the
    sum of the members' scores, an ensemble in one graph (``SequenceRanker.load_members``)."""

    def __post_init__(self) -> None:
        if self.dim % self.members:
            raise ValueError(f"dim {self.dim} is not divisible into {self.members} members")
        if self.members > 1 and self.rerank:
            raise ValueError("the re-ranker needs members=1: joined target attentions do not add up")


class HistoryTensors(NamedTuple):
    """One batch of left-padded histories [B, L(, D)]: the first five inputs of the serving signature."""

    vectors: torch.Tensor
    types: torch.Tensor
    values: torch.Tensor
    gaps: torch.Tensor
    mask: torch.Tensor


class SequenceRanker(nn.Module):
    """History (left-padded, newest last) + candidates → click logits, attention, user vector."""

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        dim, dropout = config.dim, config.dropout
        self.type_embedding = nn.Embedding(NUM_EVENT_TYPES, dim)
        self.value_embedding = nn.Embedding(NUM_VALUE_BUCKETS, dim)
        self.gap_embedding = nn.Embedding(NUM_GAP_BUCKETS, dim)
        self.position_embedding = nn.Embedding(config.max_len, dim)
        for emb in (self.type_embedding, self.value_embedding, self.gap_embedding):
            # Zero-init: a feature value never seen in training (e.g. "purchase" on MovieLens) stays neutral.
            nn.init.zeros_(emb.weight)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.input_drop = nn.Dropout(dropout)
        self.encoders = nn.ModuleList(
            CausalEncoder(
                dim // config.members,
                config.heads,
                config.layers,
                dropout,
                config.max_len if config.recency_bias else 0,
            )
            for _ in range(config.members)
        )
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        hidden = MLP_HIDDEN * config.members
        self.mlp = nn.Sequential(
            nn.Linear(SCORE_FEATURES * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    @torch.no_grad()
    def load_members(self, rankers: list[SequenceRanker]) -> None:
        """This K-member ranker's weights from K one-member rankers of width ``dim / K``, so that its
        logit is the sum of theirs: embeddings side by side, member k's encoder on slice k, and an MLP
        whose k-th block of hidden units reads member k's slice of each input block. The target attention
        (``query``, ``key``) becomes block-diagonal, which makes no sum: an ensemble ranks without the
        re-ranker."""
        k, d = self.config.members, self.config.dim // self.config.members
        if len(rankers) != k:
            raise ValueError(f"{k} members are needed, got {len(rankers)}")
        for name in ("type_embedding", "value_embedding", "gap_embedding", "position_embedding"):
            getattr(self, name).weight.copy_(torch.cat([getattr(r, name).weight for r in rankers], -1))
        first, last = self.mlp[0], self.mlp[-1]
        for linear in (first, self.query, self.key):
            linear.weight.zero_()
        last.bias.zero_()
        for j, ranker in enumerate(rankers):
            if ranker.config.members != 1 or ranker.config.dim != d:
                raise ValueError(f"member {j} is not one model of width {d}")
            self.encoders[j].load_state_dict(ranker.encoders[0].state_dict())
            own, units = slice(j * d, (j + 1) * d), slice(j * MLP_HIDDEN, (j + 1) * MLP_HIDDEN)
            self.query.weight[own, own] = ranker.query.weight
            self.key.weight[own, own] = ranker.key.weight
            for block in range(SCORE_FEATURES):
                columns = slice(block * self.config.dim + j * d, block * self.config.dim + (j + 1) * d)
                first.weight[units, columns] = ranker.mlp[0].weight[:, block * d : (block + 1) * d]
            first.bias[units] = ranker.mlp[0].bias
            last.weight[:, units] = ranker.mlp[-1].weight
            last.bias.add_(ranker.mlp[-1].bias)

    def encode(self, history: HistoryTensors) -> torch.Tensor:
        """Causal states [B, L, D]; state t has read events 0..t."""
        return self._encoded(history, newest_only=False) * history.mask.unsqueeze(-1)

    def user_state(self, history: HistoryTensors) -> torch.Tensor:
        """The newest slot's state [B, D] (``encode(history)[:, -1]``; zero for an empty history), with the
        last block computed for that slot alone: what retrieval and the serving graph read."""
        return self._encoded(history, newest_only=True)[:, -1] * history.mask[:, -1:]

    def _encoded(self, history: HistoryTensors, newest_only: bool) -> torch.Tensor:
        length = history.vectors.shape[1]
        mask = history.mask > 0.5
        positions = (torch.cumsum(history.mask, dim=1) - 1.0).clamp(0, self.config.max_len - 1).long()
        x = history.vectors + self.position_embedding(positions)
        if self.config.event_features:
            x = (
                x
                + self.type_embedding(history.types)
                + self.value_embedding(history.values)
                + self.gap_embedding(history.gaps)
            )
        x = self.input_drop(x) * history.mask.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # A query attends to real keys up to itself; padding queries attend to themselves (finite, ignored).
        allowed = (causal.unsqueeze(0) & mask.unsqueeze(1)) | torch.eye(
            length, dtype=torch.bool, device=x.device
        )
        distances = _distances(length, self.config.max_len - 1, x.device)
        parts = x.chunk(len(self.encoders), dim=-1)
        return torch.cat(
            [
                encoder(part, allowed, distances, newest_only)
                for encoder, part in zip(self.encoders, parts, strict=True)
            ],
            -1,
        )

    def target_attention(
        self, states: torch.Tensor, key_mask: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each candidate over the states: (context [..., C, D], weights [..., C, L]).

        ``states`` [B, L, D]; ``candidates`` [B, *, C, D]; ``key_mask`` broadcastable to [B, *, C, L].
        Weights are exactly 0 on masked keys and a row with no real key gives a zero context.
        """
        return _attend(
            self.query(candidates), self.key(states), states, key_mask, 1.0 / math.sqrt(self.config.dim)
        )

    def score(self, user: torch.Tensor, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Logits from user state [..., 1|C, D], context [..., C, D] and candidates [..., C, D]."""
        user = user.expand_as(candidates)
        features = torch.cat([user, context, candidates, user * candidates, context * candidates], dim=-1)
        return (user * candidates).sum(-1) + self.mlp(features).squeeze(-1)

    def forward(
        self,
        history_vectors: torch.Tensor,
        history_types: torch.Tensor,
        history_values: torch.Tensor,
        history_gaps: torch.Tensor,
        history_mask: torch.Tensor,
        candidate_vectors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The serving signature: (logits [B, C], attention [B, C, L], user_vectors [B, D])."""
        history = HistoryTensors(history_vectors, history_types, history_values, history_gaps, history_mask)
        key_mask = history_mask.unsqueeze(1)
        if self.config.rerank:
            states = self.encode(history)
            user = states[:, -1, :]  # newest slot; zero when the history is empty
            context, weights = self.target_attention(states, key_mask, candidate_vectors)
            logits = self.score(user.unsqueeze(1), context, candidate_vectors)
        else:
            # Explanations without the re-ranker: softmax over the history of each candidate's cosine
            # similarity to the history's items in the model's item space ("because you watched ...").
            user = self.user_state(history)
            unit_c = nn.functional.normalize(candidate_vectors, dim=-1)
            unit_h = nn.functional.normalize(history_vectors, dim=-1)
            _, weights = _attend(unit_c, unit_h, unit_h, key_mask, 1.0 / SIMILARITY_TEMPERATURE)
            has_history = history_mask.sum(1, keepdim=True) > 0.5
            dot = (user.unsqueeze(1) * candidate_vectors).sum(-1)
            logits = torch.where(has_history, dot, self.prior_logits(candidate_vectors))
        return logits, weights, user

    @staticmethod
    def gather_states(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """States at ``positions`` [B, P] → [B, P, D]."""
        return states.gather(1, positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))

    def sequence_logits(
        self,
        states: torch.Tensor,
        history_mask: torch.Tensor,
        positions: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Training: full logits at sampled positions ``positions`` [B, P] for ``candidates`` [B, P, C, D].

        State t and its target attention read events 0..t only (causal key mask).
        """
        length = states.shape[1]
        keys_pos = torch.arange(length, device=states.device).view(1, 1, length)
        key_mask = ((keys_pos <= positions.unsqueeze(-1)) & (history_mask > 0.5).unsqueeze(1)).to(
            states.dtype
        )
        context, _ = self.target_attention(states, key_mask.unsqueeze(2), candidates)
        return self.score(self.gather_states(states, positions).unsqueeze(2), context, candidates)

    def prior_logits(self, candidates: torch.Tensor) -> torch.Tensor:
        """Logits with an empty history: ``score`` with user state and context zero, which leaves the MLP
        on the candidate alone, so only the candidate's columns of its first layer are multiplied (the
        graph computes this for every candidate of every request: a fifth of the work on zeros)."""
        d = self.config.dim
        first = self.mlp[0]
        columns = first.weight[:, CANDIDATE_BLOCK * d : (CANDIDATE_BLOCK + 1) * d]
        return self.mlp[1:](nn.functional.linear(candidates, columns, first.bias)).squeeze(-1)


def save_ranker(ranker: SequenceRanker, path) -> None:
    """The PyTorch head beside its ONNX export (for parity tests and eager benchmarks)."""
    torch.save({"config": asdict(ranker.config), "state_dict": ranker.state_dict()}, path)


def load_ranker(path) -> SequenceRanker:
    """A saved head; one saved before ``members`` existed has its single encoder's weights at the top
    level (``blocks.*``, ``final_ln.*``), read as member 0's."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    ranker = SequenceRanker(RankerConfig(**saved["config"]))
    state = {
        f"encoders.0.{key}" if key.startswith(("blocks.", "final_ln.")) else key: value
        for key, value in saved["state_dict"].items()
    }
    ranker.load_state_dict(state)
    return ranker.eval()
