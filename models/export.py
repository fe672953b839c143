"""The export of a trained model into a model directory: the two ONNX graphs (dynamo exporter, dynamic
shapes), the PyTorch ↔ ONNX parity check, the item table, the tokenizer and the PyTorch head."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from models.data import Item
from models.encoder import ItemTextEncoder, minilm_path
from models.features import (
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    NUM_EVENT_TYPES,
    NUM_GAP_BUCKETS,
    NUM_VALUE_BUCKETS,
    RANKER_INPUTS,
    RANKER_OUTPUTS,
)
from models.model_dir import ITEM_ENCODER, RANKER, RANKER_WEIGHTS, TOKENIZER, ItemTable, ModelDir
from models.ranker import SequenceRanker, save_ranker
from models.train import RecModel

OPSET = 18
PARITY_TOLERANCE = 1e-4
"""Largest max |Δ click probability| between the PyTorch ranker and its ONNX graph that is exported."""


def random_ranker_inputs(
    batch: int, length: int, candidates: int, dim: int, generator: torch.Generator, empty_rows: int = 0
) -> tuple[torch.Tensor, ...]:
    """Left-padded random histories (some rows shorter, ``empty_rows`` with no event) and candidates."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[:empty_rows] = 0
    mask = (torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)).float()
    vectors = torch.randn(batch, length, dim, generator=generator) * mask.unsqueeze(-1)
    types = torch.randint(1, NUM_EVENT_TYPES, (batch, length), generator=generator) * mask.long()
    values = torch.randint(1, NUM_VALUE_BUCKETS, (batch, length), generator=generator) * mask.long()
    gaps = torch.randint(0, NUM_GAP_BUCKETS, (batch, length), generator=generator) * mask.long()
    cands = torch.randn(batch, candidates, dim, generator=generator)
    return vectors, types, values, gaps, mask, cands


def _export(module: torch.nn.Module, args: tuple, path: Path, names: tuple, outputs: tuple, dynamic) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(names),
            output_names=list(outputs),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            verbose=False,
        )
    program.optimize()
    program.save(str(path), external_data=False)


def export_ranker(ranker: SequenceRanker, path: Path) -> None:
    ranker.eval()
    args = random_ranker_inputs(3, 7, 5, ranker.config.dim, torch.Generator().manual_seed(0))
    b, length, c = Dim("batch"), Dim("history"), Dim("candidates")
    dynamic = (
        {0: b, 1: length},
        {0: b, 1: length},
        {0: b, 1: length},
        {0: b, 1: length},
        {0: b, 1: length},
        {0: b, 1: c},
    )
    _export(ranker, args, path, RANKER_INPUTS, RANKER_OUTPUTS, dynamic)


def export_item_encoder(encoder: ItemTextEncoder, tokenizer, path: Path, max_tokens: int) -> None:
    encoder.eval()
    batch = tokenizer(
        ["Toy Story (1995) | Animation, Children's, Comedy", "Heat (1995) | Action, Crime, Thriller", "A"],
        padding=True,
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    b, t = Dim("batch"), Dim("tokens")
    dynamic = ({0: b, 1: t}, {0: b, 1: t})
    _export(
        encoder, (batch["input_ids"], batch["attention_mask"]), path, ENCODER_INPUTS, ENCODER_OUTPUTS, dynamic
    )


def ranker_parity(ranker: SequenceRanker, path: Path, seed: int = 1) -> float:
    """Max |Δ probability| between PyTorch and ONNX Runtime over several random shapes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, length, cands in ((1, 1, 1), (2, 9, 17), (5, 50, 100), (16, 33, 7), (4, 50, 300)):
        args = random_ranker_inputs(
            batch, length, cands, ranker.config.dim, gen, empty_rows=1 if batch > 1 else 0
        )
        with torch.no_grad():
            expected = torch.sigmoid(ranker(*args)[0]).numpy()
        got = session.run(["logits"], {n: a.numpy() for n, a in zip(RANKER_INPUTS, args, strict=True)})[0]
        if not np.isfinite(got).all():
            return float("inf")
        worst = max(worst, float(np.abs(1.0 / (1.0 + np.exp(-got)) - expected).max()))
    return worst


def graph_shapes(dim: int) -> dict[str, dict[str, dict[str, list[str | int]]]]:
    """The two graphs' input and output shapes, for the manifest (B, L, C, T dynamic; D = ``dim``)."""
    history = ["B", "L"]
    return {
        RANKER: {
            "inputs": dict(
                zip(RANKER_INPUTS, ([*history, dim], *[history] * 4, ["B", "C", dim]), strict=True)
            ),
            "outputs": dict(zip(RANKER_OUTPUTS, (["B", "C"], ["B", "C", "L"], ["B", dim]), strict=True)),
        },
        ITEM_ENCODER: {
            "inputs": {name: ["B", "T"] for name in ENCODER_INPUTS},
            "outputs": {name: ["B", dim] for name in ENCODER_OUTPUTS},
        },
    }


def item_table(model: RecModel, items: Sequence[Item], trained: np.ndarray) -> ItemTable:
    """Every item's final vector (text vector + ID embedding) and its ID-embedding part, which is zero
    for items outside ``trained`` (their ID embedding never received a gradient)."""
    model.eval()
    with torch.no_grad():
        text_vectors = model.tower.text_vectors().numpy()
        id_offsets = model.tower.id_embedding.weight.numpy().copy()
    untrained = np.ones(len(items), dtype=bool)
    untrained[trained] = False
    id_offsets[untrained] = 0.0
    return ItemTable(
        item_ids=[it.item_id for it in items],
        texts=[it.text for it in items],
        vectors=(text_vectors + id_offsets).astype(np.float32),
        id_offsets=id_offsets.astype(np.float32),
    )


def export_model(
    out: ModelDir, model: RecModel, table: ItemTable, bert: torch.nn.Module, tokenizer, max_text_tokens: int
) -> float:
    """Write every file of ``out`` but the manifest and the reports; returns the ranker's ONNX parity
    (max |Δ probability|), raising RuntimeError above ``PARITY_TOLERANCE``."""
    model.eval()
    out.write_item_table(table)
    shutil.copyfile(minilm_path() / TOKENIZER, out.file(TOKENIZER))
    export_ranker(model.ranker, out.file(RANKER))
    save_ranker(model.ranker, out.file(RANKER_WEIGHTS))
    encoder = ItemTextEncoder(bert, model.tower.projection)
    export_item_encoder(encoder, tokenizer, out.file(ITEM_ENCODER), max_text_tokens)
    parity = ranker_parity(model.ranker, out.file(RANKER))
    if parity > PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX ranker disagrees with PyTorch: max |Δp| = {parity:.2e} > {PARITY_TOLERANCE}"
        )
    return parity
