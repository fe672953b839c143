"""The trained + exported model: ONNX ↔ PyTorch parity, manifest, metrics harness."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loadtests.server import process_tree, running
from models.calibration import Calibration
from models.data import Dataset, Item, load_dataset
from models.encoder import MINILM_DIM
from models.ensemble import fit_members
from models.evaluate import make_split, rank_metrics
from models.export import RANKER_INPUTS, export_ranker, random_ranker_inputs, ranker_parity
from models.pipeline import (
    COVISIT_WEIGHTS,
    RETRIEVAL_ONLY_ROW,
    SERVED_ROW,
    TrainConfig,
    export_manifest,
    fit_exported_model,
)
from models.ranker import HistoryTensors, RankerConfig, SequenceRanker, load_ranker
from models.sequences import UserSequence, make_windows, user_sequences
from models.train import MASKED, FitConfig, FitData, _seen_pairs, _without_seen, fit

SHAPES = [(1, 1, 1), (1, 50, 100), (3, 7, 5), (8, 20, 64), (32, 13, 300), (64, 50, 100)]


@pytest.fixture(scope="module")
def ranker_pair(model_dir: Path):
    session = ort.InferenceSession(str(model_dir / "ranker.onnx"), providers=["CPUExecutionProvider"])
    return load_ranker(model_dir / "ranker.pt"), session


@pytest.mark.parametrize(("batch", "length", "candidates"), SHAPES)
def test_onnx_matches_pytorch(ranker_pair, batch: int, length: int, candidates: int) -> None:
    ranker, session = ranker_pair
    gen = torch.Generator().manual_seed(1000 + batch * length + candidates)
    args = random_ranker_inputs(
        batch, length, candidates, ranker.config.dim, gen, empty_rows=min(1, batch - 1)
    )
    with torch.no_grad():
        logits, attention, user = (t.numpy() for t in ranker(*args))
    got = session.run(None, {name: a.numpy() for name, a in zip(RANKER_INPUTS, args, strict=True)})
    assert all(np.isfinite(g).all() for g in got)
    prob = 1.0 / (1.0 + np.exp(-logits))
    assert np.abs(1.0 / (1.0 + np.exp(-got[0])) - prob).max() <= 1e-4
    assert np.abs(got[1] - attention).max() <= 1e-4
    assert np.abs(got[2] - user).max() <= 1e-4
    mask = args[4].numpy()
    sums = got[1].sum(-1)
    assert np.allclose(sums[mask.sum(1) > 0], 1.0, atol=1e-4), "attention is a distribution over real events"
    assert np.allclose(got[1] * (1 - mask[:, None, :]), 0.0), "no attention on padding"


def test_history_changes_the_prediction(ranker_pair) -> None:
    ranker, _ = ranker_pair
    gen = torch.Generator().manual_seed(7)
    a = random_ranker_inputs(2, 10, 6, ranker.config.dim, gen)
    b = (a[0].flip(0), *a[1:5], a[5])  # same candidates, swapped histories
    with torch.no_grad():
        assert not torch.allclose(ranker(*a)[0], ranker(*b)[0], atol=1e-4)


def test_manifest_describes_the_export(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest, name
    assert set(manifest["graphs"]["ranker.onnx"]["inputs"]) == set(RANKER_INPUTS)
    assert manifest["parity"]["ranker_max_abs_prob_diff"] <= 1e-4
    table = manifest["metrics"]["table"]
    rows = {"popularity", "id-only transformer", "clickrank (BERT + transformer)", SERVED_ROW}
    assert set(table) == rows | ({RETRIEVAL_ONLY_ROW} if manifest["config"]["rerank"] else set())
    by_weight = manifest["metrics"]["covisit"]["valid_ndcg10_by_weight"]
    assert set(by_weight) == {f"{w:g}" for w in COVISIT_WEIGHTS}
    assert all(0 < v < 1 for v in by_weight.values())
    vectors = np.load(model_dir / "item_vectors.npy")
    assert vectors.shape == (manifest["num_items"], manifest["config"]["dim"])
    assert (model_dir / "training_curve.png").stat().st_size > 10_000


def test_cold_items_rank_from_text_only(model_dir: Path) -> None:
    """Even the tiny config ranks withheld items above chance from text; ID-only cannot."""
    table = json.loads((model_dir / "metrics.json").read_text())["table"]
    assert table["clickrank (BERT + transformer)"]["cold"]["AUC"] > 0.6
    assert abs(table["id-only transformer"]["cold"]["AUC"] - 0.5) < 0.15
    assert table["popularity"]["cold"]["AUC"] == pytest.approx(0.5)


def test_rank_metrics_on_known_rankings() -> None:
    scores = np.array([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
    allowed = np.ones_like(scores, dtype=bool)
    allowed[1, 3] = False  # item 3 excluded for case 1 (e.g. already seen)
    m = rank_metrics(scores, np.array([0, 0, 2]), allowed)
    # ranks: 1, 3 (item 3 excluded), 2.5 (all tied among 4)
    assert m["HR@10"] == 1.0
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2.5) / 3)
    assert m["AUC"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / np.log2(4) + 1 / np.log2(3.5)) / 3)


def _toy_sequences(users: int, items: int, length: int, seed: int) -> list[UserSequence]:
    """Users walking a ring of items (item t+1 follows item t), so the next item is learnable."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(users):
        start = int(rng.integers(items))
        seq = (start + np.arange(length)) % items
        out.append(UserSequence(str(u), seq.astype(np.int64), np.full(length, 1), np.arange(length) * 60.0))
    return out


def _ring_config(**overrides) -> FitConfig:
    """A recipe that learns the toy ring in a few seconds."""
    recipe = dict(
        dim=16, members=1, history_length=10, epochs=6, batch_size=32, dropout=0.1, lr=1e-2, stride=5,
        min_epochs=0, patience=6,
    )  # fmt: skip
    return FitConfig(**(recipe | overrides))


@pytest.mark.parametrize("rerank", [False, True])
def test_whole_catalog_softmax_learns_a_sequence_and_serves_as_trained(rerank: bool) -> None:
    """Both recipes learn "what follows what" on a toy ring; the re-ranked shortlist sits above the rest,
    and the graph's logits are the retrieval scores when the re-ranker is off."""
    items = 40
    split = make_split(_toy_sequences(120, items, 30, seed=0), items, cold_fraction=0.0, seed=0)
    cfg = _ring_config(rerank=rerank, rerank_hard=8, rerank_uniform=4, rerank_size=10)
    windows = cfg.windows(split.train)
    result = fit("toy", FitData(windows, split.valid, split.train_items, items, None), cfg)
    assert max(c["valid_hr10"] for c in result.curve) > 0.6  # chance is 10 / 40
    model = result.model
    served, retrieval = model.scores([c.history for c in split.test[:8]])
    ranked = model.score_all([c.history for c in split.test[:8]])
    top = np.argsort(-retrieval, axis=1)[:, : cfg.rerank_size]
    rest = np.ones_like(ranked, dtype=bool)
    np.put_along_axis(rest, top, False, 1)
    if rerank:
        assert (np.take_along_axis(ranked, top, 1).min(1) > np.where(rest, ranked, -np.inf).max(1)).all()
    else:
        np.testing.assert_allclose(served, retrieval)
        np.testing.assert_allclose(ranked, retrieval)


def test_the_training_softmax_masks_each_positions_earlier_items(data_dir: Path) -> None:
    """``exclude_seen``: at every trained position the user's earlier items (before the window and in it,
    up to the position) are masked, the target never; the sampled softmax masks the same (row, item)
    pairs as the whole-catalog one."""
    sequences = sorted(user_sequences(load_dataset(data_dir)), key=len)[-4:]
    windows = make_windows(sequences, length=20, stride=10, min_context=11)
    rows = np.array([0, 1, 5, len(windows) - 1])
    batch = {k: torch.from_numpy(getattr(windows, k)[rows]) for k in ("items", "mask", "targets")}
    batch["earlier_rows"], batch["earlier_items"] = map(torch.from_numpy, windows.earlier_items(rows))
    valid = batch["targets"] >= 0
    targets = batch["targets"][valid]
    items = 1682
    logits = torch.randn(len(targets), items)
    seen = _seen_pairs(batch, valid)
    full, _, _ = _without_seen((logits, targets, None), seen, items)
    offsets = np.cumsum([0] + [len(s) for s in sequences]).tolist()
    m = 0
    for k, row in enumerate(rows):
        seq = sequences[offsets.index(windows.earlier[row][0])]  # the window's user (tests/test_data.py)
        for target in batch["targets"][k][valid[k]].tolist():
            earlier = seq.items[: int(np.flatnonzero(seq.items == target)[0])]
            expected = np.zeros(items, dtype=bool)
            expected[earlier] = True
            assert ((full[m] <= MASKED / 2).numpy() == expected).all()
            m += 1
    assert m == len(targets)
    ids = torch.cat([targets, torch.randint(items, (300,))])
    sampled, _, _ = _without_seen((logits[:, ids], torch.arange(len(targets)), ids), seen, items)
    assert torch.equal(sampled, full[:, ids])


def test_the_manifest_records_the_refit_recipe_beside_the_harness_one() -> None:
    """A warm-started refit trains ``refit_epochs`` at a quarter of the harness's rate: the manifest's
    ``config`` is that recipe (it produced the exported weights), the harness's is ``harness_config``."""
    items = 40
    sequences = _toy_sequences(60, items, 20, seed=1)
    cfg = FitConfig(
        dim=8,
        members=1,
        history_length=10,
        epochs=2,
        batch_size=64,
        stride=5,
        lr=1e-2,
        min_epochs=0,
        seed=3,
    )
    config = TrainConfig(fit=cfg, refit_epochs=1)
    split = make_split(sequences, items, cold_fraction=0.0, seed=cfg.seed)
    windows = cfg.windows(split.train)
    harness_fit = fit("toy", FitData(windows, split.valid, split.train_items, items, None), cfg)
    harness = {"fit": harness_fit, "calibration": Calibration(slope=0.5), "rows": {}, "split": {},
               "fit_seconds": {}, "best_epoch": harness_fit.best_epoch, "test_calibration": {},
               "covisit": {}}  # fmt: skip
    final, recipe = fit_exported_model(sequences, items, None, config, harness)
    data = Dataset([Item(str(i), f"Item {i}", "", ()) for i in range(items)], None, "ab" * 32)  # type: ignore[arg-type]
    manifest = export_manifest(data, Path("toy"), config, harness, final, recipe, parity=0.0)
    assert (manifest["config"]["epochs"], manifest["config"]["lr"]) == (1, pytest.approx(cfg.lr / 4))
    assert (manifest["harness_config"]["epochs"], manifest["harness_config"]["lr"]) == (2, cfg.lr)
    assert manifest["fit"] == {"recipe": "the harness's model, refitted on all events", "final_epoch": [1]}
    assert manifest["seed"] == 3 and manifest["calibration"]["slope"] == 0.5
    assert manifest["version"].endswith("-abababab") and manifest["num_items"] == items


def test_an_ensemble_scores_the_sum_of_its_members(tmp_path: Path) -> None:
    """Two members fitted apart (each alone ranks the ring well) join into one model whose scores, with a
    history and without one (the prior), are the sums of theirs; its ranker exports to ONNX and agrees
    with PyTorch. Fitting them in two processes gives the same members. The re-ranker cannot be joined."""
    items, half = 40, 8
    split = make_split(_toy_sequences(120, items, 30, seed=2), items, cold_fraction=0.0, seed=0)
    cfg = _ring_config(dim=2 * half, members=2)
    text = torch.randn(items, MINILM_DIM, generator=torch.Generator().manual_seed(0))
    args = ("toy", FitData(cfg.windows(split.train), split.valid, split.train_items, items, text), cfg)
    with pytest.raises(ValueError, match="one model"):
        fit(*args)
    with pytest.raises(ValueError, match="re-ranker"):
        _ring_config(dim=2 * half, members=2, rerank=True)
    result = fit_members(*args)
    first, second = (m.model for m in result.members)
    assert [m.config.seed for m in result.members] == [cfg.seed, cfg.seed + 100]
    assert [m.config.dim for m in result.members] == [half, half]
    histories = [c.history for c in split.test[:32]]
    targets = np.array([c.target for c in split.test[:32]])
    for member in (first, second):
        top10 = np.argsort(-member.score_all(histories), axis=1)[:, :10]
        assert (top10 == targets[:, None]).any(1).mean() > 0.6  # chance is 10 / 40
    joined = result.model
    expected = first.score_all(histories) + second.score_all(histories)
    np.testing.assert_allclose(joined.score_all(histories), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        vectors = joined.tower()
        torch.testing.assert_close(vectors, torch.cat([first.tower(), second.tower()], -1))
        prior = joined.ranker.prior_logits(vectors)
        parts = first.ranker.prior_logits(first.tower()) + second.ranker.prior_logits(second.tower())
    torch.testing.assert_close(prior, parts)
    export_ranker(joined.ranker, tmp_path / "ranker.onnx")
    assert ranker_parity(joined.ranker, tmp_path / "ranker.onnx") <= 1e-4
    in_processes = fit_members(*args, jobs=2)
    assert [m.best_epoch for m in in_processes.members] == [m.best_epoch for m in result.members]
    np.testing.assert_allclose(in_processes.model.score_all(histories), expected, rtol=1e-4, atol=1e-3)


def test_the_distance_bias_reads_how_far_back_an_event_lies(tmp_path: Path) -> None:
    """With ``recency_bias`` a head can attend by distance, whatever the history's length: a strongly
    negative bias beyond distance 0 leaves the newest state blind to every earlier event (plain attention
    reads them), and the exported graph agrees with PyTorch with a bias in it."""
    ranker = SequenceRanker(RankerConfig(dim=8, max_len=6, rerank=False, recency_bias=True)).eval()
    _, types, values, gaps, _, _ = random_ranker_inputs(4, 6, 3, 8, torch.Generator().manual_seed(0))
    full = torch.ones(4, 6)
    history = HistoryTensors(torch.randn(4, 6, 8), types.clamp(min=1), values.clamp(min=1), gaps, full)
    earlier_changed = history._replace(vectors=torch.cat([torch.randn(4, 5, 8), history.vectors[:, 5:]], 1))
    blocks = ranker.encoders[0].blocks
    with torch.no_grad():
        assert not torch.allclose(ranker.encode(earlier_changed)[:, -1], ranker.encode(history)[:, -1])
        for block in blocks:
            block.distance_bias[:, 1:] = -1e4
        torch.testing.assert_close(ranker.encode(earlier_changed)[:, -1], ranker.encode(history)[:, -1])
        for block in blocks:
            block.distance_bias.normal_(generator=torch.Generator().manual_seed(1))
    export_ranker(ranker, tmp_path / "ranker.onnx")
    assert ranker_parity(ranker, tmp_path / "ranker.onnx") <= 1e-4


MEMBERS_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from models.ensemble import fit_members
from models.evaluate import make_split
from models.train import FitData
from test_model import _ring_config, _toy_sequences

if __name__ == "__main__":
    split = make_split(_toy_sequences(120, 40, 30, seed=2), 40, cold_fraction=0.0, seed=0)
    cfg = _ring_config(members=2, epochs=100_000, patience=100_000)
    data = FitData(cfg.windows(split.train), split.valid, split.train_items, 40, None)
    fit_members("toy", data, cfg, jobs=2)
"""


def test_member_fits_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A parent killed by SIGTERM (its handler never runs) takes its member-fitting processes with it,
    instead of leaving them training for minutes."""
    script = tmp_path / "members.py"
    tests = Path(__file__).resolve().parent
    script.write_text(MEMBERS_SCRIPT.format(repo=str(tests.parent), tests=str(tests)))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers := _member_processes(parent.pid)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the members never started"
            time.sleep(0.2)
        time.sleep(3)  # the workers are fitting by now
        parent.send_signal(signal.SIGTERM)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive := [pid for pid in workers if running(pid)]:
            assert time.monotonic() < deadline, f"workers {alive} outlived their parent"
            time.sleep(0.2)
    finally:  # orphans included, should this fail
        for pid in {*process_tree(parent.pid), *workers}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _member_processes(parent: int) -> list[int]:
    """The pool's worker processes under ``parent`` (not multiprocessing's resource tracker)."""
    found = []
    for pid in process_tree(parent)[1:]:
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and running(pid):
                found.append(pid)
    return found


def test_the_user_state_is_the_newest_slot_of_the_full_encoding() -> None:
    """``user_state`` computes the last block for the newest slot alone: the same vector as ``encode``'s
    newest slot, for padded and empty histories, one model and two, with a distance bias in every block."""
    for members in (1, 2):
        config = RankerConfig(dim=8, max_len=6, rerank=False, recency_bias=True, members=members)
        ranker = SequenceRanker(config)
        generator = torch.Generator().manual_seed(members)
        with torch.no_grad():
            for encoder in ranker.encoders:
                for block in encoder.blocks:
                    block.distance_bias.normal_(generator=generator)
            args = random_ranker_inputs(9, 6, 3, 8, generator, empty_rows=2)
            history = HistoryTensors(*args[:5])
            expected = ranker.eval().encode(history)[:, -1]
            assert expected[:2].abs().max() == 0 and expected[2:].abs().min(1).values.min() > 0
            torch.testing.assert_close(ranker.user_state(history), expected, rtol=1e-5, atol=1e-6)


def test_the_prior_is_the_score_of_an_empty_history() -> None:
    """``prior_logits`` multiplies only the candidate's columns: the same logits as ``score`` with user
    state and context zero, for one model and for two joined ones."""
    for members in (1, 2):
        ranker = SequenceRanker(RankerConfig(dim=8, max_len=5, rerank=False, members=members)).eval()
        candidates = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(members))
        zeros = torch.zeros_like(candidates)
        with torch.no_grad():
            expected = ranker.score(zeros, zeros, candidates)
            torch.testing.assert_close(ranker.prior_logits(candidates), expected)


def test_a_head_saved_before_members_existed_loads(tmp_path: Path) -> None:
    """``ranker.pt`` files exported before ``members`` keep their encoder at the top level of the state."""
    ranker = SequenceRanker(RankerConfig(dim=8, max_len=5)).eval()
    old_state = {key.removeprefix("encoders.0."): value for key, value in ranker.state_dict().items()}
    torch.save({"config": {"dim": 8, "max_len": 5}, "state_dict": old_state}, tmp_path / "ranker.pt")
    loaded = load_ranker(tmp_path / "ranker.pt")
    args = random_ranker_inputs(2, 4, 3, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args)[0], ranker(*args)[0])
