"""The exported model read straight from disk and run by hand with onnxruntime: the tests' oracle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.features import encode_window, event_type_id, value_bucket
from models.model_dir import ModelDir


class ModelFiles:
    """The exported model as ``ModelDir`` loads it, run without the service's code."""

    def __init__(self, model_dir: Path) -> None:
        model = ModelDir(model_dir).load()
        self.manifest = model.manifest
        self.item_ids = model.items.item_ids
        self.texts = model.items.texts
        self.row = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.vectors = model.items.vectors
        self.live_catalog: Callable[[], np.ndarray] = lambda: self.vectors.astype(np.float64)
        """The item vectors the service normalises over (set to the app's catalog by the fixture)."""
        self.session = ort.InferenceSession(model.ranker_onnx, providers=["CPUExecutionProvider"])

    @property
    def history_length(self) -> int:
        return int(self.manifest["config"]["history_length"])

    def _run(
        self, events: list[dict[str, Any]], candidate_vectors: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(logits [C], user vector [D]) of ranker.onnx for one user, features built by hand (padded to L)."""
        events = sorted(events, key=lambda e: e["timestamp"])[-self.history_length :]
        length = self.history_length
        types, values, gaps, mask = encode_window(
            [event_type_id(e["type"]) for e in events],
            [value_bucket(e.get("value")) for e in events],
            [float(e["timestamp"]) for e in events],
            length,
        )
        history = np.zeros((length, self.vectors.shape[1]), dtype=np.float32)
        if events:
            history[length - len(events) :] = self.vectors[[self.row[e["item_id"]] for e in events]]
        logits, user = self.session.run(
            ["logits", "user_vectors"],
            {
                "history_vectors": history[None],
                "history_types": types[None],
                "history_values": values[None],
                "history_gaps": gaps[None],
                "history_mask": mask[None],
                "candidate_vectors": candidate_vectors[None],
            },
        )
        return logits[0].astype(np.float64), user[0].astype(np.float64)

    def probabilities(self, events: list[dict[str, Any]], candidates: list[str]) -> np.ndarray:
        """The calibrated click probability, written out by hand: the candidates' logits against the log
        partition of the live catalog's retrieval logits (of the history-free prior's logits without
        history), through the manifest's Platt scaling."""
        logits, user = self._run(events, self.vectors[[self.row[c] for c in candidates]])
        catalog = self.live_catalog()
        partition = catalog @ user if events else self._run([], catalog.astype(np.float32))[0]
        z = logits - (partition.max() + np.log(np.exp(partition - partition.max()).sum()))
        cal = self.manifest["calibration"]
        return 1.0 / (1.0 + np.exp(-(cal["slope"] * z + cal["intercept"])))
