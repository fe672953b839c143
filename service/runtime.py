"""ONNX Runtime sessions of the two exported graphs, with shape-bucket padding.

The sessions and the tokenizer are built from a ``ServedModel``: the very bytes ``ModelDir.load`` checked
against the manifest (``models/model_dir.py``). ``rank`` runs one
``ranker.onnx`` call for a whole micro-batch: histories are left-padded (newest event in the last slot,
as in training) and candidate lists right-padded to a few fixed bucket sizes, so the runtime only ever
sees a handful of shapes, all of which ``warm_up`` runs once before the first request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.calibration import Calibration
from models.features import ENCODER_INPUTS, ENCODER_OUTPUTS, RANKER_INPUTS, RANKER_OUTPUTS
from models.model_dir import ITEM_ENCODER, RANKER, TOKENIZER, ModelLoadError, ServedModel
from service.metrics import INFERENCE_SECONDS

log = logging.getLogger("clickrank.runtime")

HISTORY_BUCKETS: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
"""Padded history lengths; the manifest's ``history_length`` replaces every larger bucket."""
CANDIDATE_BUCKETS: tuple[int, ...] = (1, *range(16, 129, 16), 160, 192, 256, 320, 384, 512, 768, 1024)
"""Padded candidate counts. The ranker's cost is linear in candidates on CPU, so padding is paid in full:
100 candidates padded to 128 cost 9-19% more ranker time than unpadded; up to 128 the steps are 16 wide.
1 for the user-vector probe of predict and recommend (one zero candidate): a batch of probes padded to 16
cost 3-6% more graph time (full-size export, batch 4-16). 320 because /v1/recommend ranks 300 retrieved
items by default. Beyond the last bucket the count is rounded up to a multiple of it."""
ENCODE_BATCH = 64
"""Texts per ``item_encoder.onnx`` call (texts are sorted by length first, so little is padding)."""

CUDA = "CUDAExecutionProvider"
CUDA_OPTIONS = {
    # Same-as-requested arena growth: with dynamic shapes, power-of-two growth over-reserves GPU memory.
    "arena_extend_strategy": "kSameAsRequested",
    # Full float32 matrix products, not TF32 (ONNX Runtime's default on Ampere and later). Measured on an
    # H200 with the full-size model: with TF32 a probability moved by up to 4e-4 (relative) from the CPU's
    # and item vectors by 3.6e-4, so GPU and CPU replicas answered differently; in float32 the vectors
    # agree to 6.9e-7. The price is the encoder's speed (30,569 → 19,693 items/s, still 9.9× 16 CPU cores).
    "use_tf32": "0",
}
CPU = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True)
class History:
    """One user's history as the ranker reads it, unpadded: ``n >= 0`` real events, oldest first."""

    vectors: np.ndarray  # [n, D] f32
    types: np.ndarray  # [n] i64 (models.features.event_type_id)
    values: np.ndarray  # [n] i64 (models.features.value_bucket)
    gaps: np.ndarray  # [n] i64 (models.features.gap_buckets of the n timestamps)

    def __len__(self) -> int:
        return len(self.vectors)


@dataclass(frozen=True, slots=True)
class RankRequest:
    """One request's ranker input: a history and ``C >= 1`` candidates."""

    history: History
    candidate_vectors: np.ndarray  # [C, D] f32


@dataclass
class RankResult:
    logits: np.ndarray  # [C] f32
    attention: np.ndarray  # [C, n] f32, over the real events only (of the truncated history)
    user_vector: np.ndarray  # [D] f32


def bucket(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= size; past the last one, the next multiple of the last one."""
    for b in buckets:
        if size <= b:
            return b
    last = buckets[-1]
    return -(-size // last) * last


def history_buckets(history_length: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in HISTORY_BUCKETS if b < history_length} | {history_length}))


def session_providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """The providers to ask ONNX Runtime for: CUDA (with CPU for the ops CUDA lacks) or CPU alone."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, not {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ModelLoadError(
            f"device=cuda, but this onnxruntime offers only {available}; install onnxruntime-gpu "
            "(and the CUDA libraries) or use device=auto/cpu"
        )
    if device == "cpu" or CUDA not in available:
        return [CPU]
    return [(CUDA, CUDA_OPTIONS), CPU]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    # The memory-pattern planner records one plan per input shape; batch sizes vary freely, so it would
    # keep re-planning and caching. The arena still recycles buffers across calls.
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: CPU fallback of shape ops under CUDA is expected
    return options


class OnnxModels:
    """The ranker and item-encoder sessions of one verified model. Thread-safe; calls are sync."""

    def __init__(self, model: ServedModel, *, device: str = "auto", intra_op_threads: int = 0) -> None:
        providers = session_providers(device)
        self.manifest = model.manifest
        config = self.manifest["config"]
        self.version: str = self.manifest["version"]
        self.dim: int = config["dim"]
        self.history_length: int = config["history_length"]
        self.max_text_tokens: int = config["max_text_tokens"]
        self.history_buckets = history_buckets(self.history_length)
        self.dot_logits: bool = config.get("rerank") is False
        """With a history, a candidate's logit is ⟨user vector, item vector⟩ (no re-ranker, see
        ``models.ranker``): predict and recommend compute it from the user vector (``Ranker._logits``)
        instead of running the graph over the candidates."""
        self.calibration = Calibration.from_json(self.manifest.get("calibration"))

        options = session_options(intra_op_threads)
        self._ranker = self._session(
            RANKER, model.ranker_onnx, options, providers, RANKER_INPUTS, RANKER_OUTPUTS
        )
        self._encoder = self._session(
            ITEM_ENCODER, model.item_encoder_onnx, options, providers, ENCODER_INPUTS, ENCODER_OUTPUTS
        )
        self.providers: list[str] = self._ranker.get_providers()
        if providers[0] != CPU and self.providers[0] != CUDA:
            if device == "cuda":
                raise ModelLoadError(
                    f"device=cuda, but ONNX Runtime could not start CUDA (got {self.providers})"
                )
            log.warning("CUDA is offered but could not be started; running on %s", self.providers)

        try:
            self._tokenizer = Tokenizer.from_str(model.tokenizer_json)
        except Exception as exc:
            raise ModelLoadError(f"{TOKENIZER} in {model.source} is not a valid tokenizer: {exc}") from exc
        padding = self._tokenizer.padding
        self._pad_id = int(padding["pad_id"]) if padding else int(self._tokenizer.token_to_id("[PAD]") or 0)
        self._tokenizer.no_padding()  # encode_texts pads each length-sorted chunk itself
        self._tokenizer.enable_truncation(max_length=self.max_text_tokens)

        log.info("loaded model %s from %s on %s", self.version, model.source, self.providers)

    def _session(
        self,
        name: str,
        blob: bytes,
        options: ort.SessionOptions,
        providers: list,
        inputs: tuple[str, ...],
        outputs: tuple[str, ...],
    ) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(blob, sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load {name}: {exc}") from exc
        got_in = tuple(i.name for i in session.get_inputs())
        got_out = {o.name for o in session.get_outputs()}
        if sorted(got_in) != sorted(inputs) or not set(outputs) <= got_out:
            raise ModelLoadError(
                f"{name} has inputs {got_in} and outputs {sorted(got_out)}; expected {inputs} → {outputs}"
            )
        return session

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResult]:
        """Score every request's candidates in ONE ``ranker.onnx`` call; results are cut back to size.

        Histories longer than ``history_length`` keep their newest events (the first kept event's gap
        becomes 0, as for the first event of any window). Raises ValueError for a malformed request.
        """
        if not requests:
            return []
        lengths = [self._check(i, r) for i, r in enumerate(requests)]
        counts = [len(r.candidate_vectors) for r in requests]
        b, d = len(requests), self.dim
        length = bucket(max(lengths), self.history_buckets)
        width = bucket(max(counts), CANDIDATE_BUCKETS)
        vectors = np.zeros((b, length, d), dtype=np.float32)
        types = np.zeros((b, length), dtype=np.int64)
        values = np.zeros((b, length), dtype=np.int64)
        gaps = np.zeros((b, length), dtype=np.int64)
        mask = np.zeros((b, length), dtype=np.float32)
        candidates = np.zeros((b, width, d), dtype=np.float32)
        for i, (r, n, c) in enumerate(zip(requests, lengths, counts, strict=True)):
            if n:
                start = length - n
                history = r.history
                vectors[i, start:] = history.vectors[-n:]
                types[i, start:] = history.types[-n:]
                values[i, start:] = history.values[-n:]
                gaps[i, start:] = history.gaps[-n:]
                if n < len(history):
                    gaps[i, start] = 0  # truncated: the oldest kept event opens the window
                mask[i, start:] = 1.0
            candidates[i, :c] = r.candidate_vectors
        feeds = dict(zip(RANKER_INPUTS, (vectors, types, values, gaps, mask, candidates), strict=True))
        started = time.perf_counter()
        logits, attention, users = self._ranker.run(list(RANKER_OUTPUTS), feeds)
        INFERENCE_SECONDS.labels(graph="ranker").observe(time.perf_counter() - started)
        return [
            RankResult(
                logits=logits[i, :c].copy(),
                attention=attention[i, :c, length - n :].copy(),
                user_vector=users[i].copy(),
            )
            for i, (n, c) in enumerate(zip(lengths, counts, strict=True))
        ]

    def _check(self, index: int, r: RankRequest) -> int:
        """The number of history events the ranker reads for one request, after checking its shapes."""
        history = r.history
        n = len(history)
        if history.vectors.ndim != 2 or history.vectors.shape[1] != self.dim:
            raise ValueError(
                f"request {index}: history_vectors must be [n, {self.dim}], got {history.vectors.shape}"
            )
        for name in ("types", "values", "gaps"):
            if getattr(history, name).shape != (n,):
                got = getattr(history, name).shape
                raise ValueError(f"request {index}: history_{name} must be [{n}], got {got}")
        if (
            r.candidate_vectors.ndim != 2
            or r.candidate_vectors.shape[1] != self.dim
            or not len(r.candidate_vectors)
        ):
            raise ValueError(
                f"request {index}: candidate_vectors must be [C >= 1, {self.dim}], "
                f"got {r.candidate_vectors.shape}"
            )
        return min(n, self.history_length)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Item text → text vector ``[n, D]`` (the text part only; no ID embedding)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        sizes = np.array([len(e.ids) for e in encodings])
        order = np.argsort(sizes, kind="stable")
        for start in range(0, len(order), ENCODE_BATCH):
            rows = order[start : start + ENCODE_BATCH]
            width = int(sizes[rows].max())
            ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for j, row in enumerate(rows):
                ids[j, : sizes[row]] = encodings[row].ids
                mask[j, : sizes[row]] = 1
            started = time.perf_counter()
            (vectors,) = self._encoder.run(list(ENCODER_OUTPUTS), {"input_ids": ids, "attention_mask": mask})
            INFERENCE_SECONDS.labels(graph="item_encoder").observe(time.perf_counter() - started)
            out[rows] = vectors
        return out

    def warm_up(self) -> None:
        """Run every (history, candidate) bucket pair and the encoder once: no request pays a first run.

        Also a self-test: a graph that gives non-finite outputs (e.g. for an empty history) is refused.
        """
        empty = np.zeros(0, dtype=np.int64)
        for length in self.history_buckets:
            events = np.ones(length, dtype=np.int64)
            history = np.zeros((length, self.dim), dtype=np.float32)
            for width in CANDIDATE_BUCKETS:
                candidates = np.zeros((width, self.dim), dtype=np.float32)
                full, cold = self.rank(
                    [
                        RankRequest(History(history, events, events, events), candidates),
                        RankRequest(History(history[:0], empty, empty, empty), candidates),
                    ]
                )
                for result, n in ((full, length), (cold, 0)):
                    if not all(
                        np.isfinite(a).all() for a in (result.logits, result.attention, result.user_vector)
                    ):
                        raise ModelLoadError(
                            f"{RANKER} gives non-finite outputs for {n} history events and {width} candidates"
                        )
        texts = ["warm up", "a longer warm up text " * self.max_text_tokens]
        if not np.isfinite(self.encode_texts(texts)).all():
            raise ModelLoadError(f"{ITEM_ENCODER} gives non-finite outputs")


async def encode_off_loop(models: OnnxModels, texts: Sequence[str]) -> np.ndarray:
    """``models.encode_texts`` in a worker thread: the event loop keeps serving while BERT runs."""
    return await asyncio.to_thread(models.encode_texts, list(texts))
