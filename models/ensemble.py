"""An ensemble of independently fitted models, served as one.

Each member is the whole recipe with its own seed (``FitConfig.member``), fitted alone, in a process of
its own when there are cores for it. The members are then joined into one ``RecModel`` whose item vectors
and user states are theirs side by side (``ItemTower.load_members``, ``SequenceRanker.load_members``):
its logit ⟨u, v⟩ is the sum of the members' logits, so it ranks as the mean of their log-softmax scores,
and retrieval, calibration, the ONNX graphs and the service treat it as one wider model.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from models.train import FitConfig, FitData, FitResult, RecModel, fit


def join_members(models: list[RecModel], cfg: FitConfig) -> RecModel:
    """One model scoring the sum of ``models``' logits (``cfg``: the ensemble's recipe, one per member)."""
    text = models[0].tower.text_features if models[0].tower.use_text else None
    joined = RecModel(len(models[0].tower.id_embedding.weight), text, cfg)
    joined.tower.load_members([m.tower for m in models])
    joined.ranker.load_members([m.ranker for m in models])
    return joined.eval()


PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when the thread that started it ends."""


def _end_with_parent(parent: int) -> None:
    """Worker initializer: a member fit runs for minutes, and a parent killed by a signal (a scheduler's
    SIGTERM, ``kill``) would leave it running. On Linux the kernel sends the worker SIGTERM when the thread
    that started it ends (here the one that waits for the results); a parent already gone when the worker
    starts ends it at once."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _fit_in_process(threads: int, *args, **kwargs) -> FitResult:
    torch.set_num_threads(threads)
    return fit(*args, **kwargs)


def fit_members(
    name: str, data: FitData, cfg: FitConfig, jobs: int = 1, init: FitResult | None = None
) -> FitResult:
    """``models.train.fit`` of each of ``cfg.members`` members, ``jobs`` at a time in processes of their
    own (torch's threads shared among them), joined into one model; one member is ``fit`` itself.
    ``init`` warm-starts each member from the same member of an earlier ensemble fit."""
    configs = [cfg.member(k) for k in range(cfg.members)]
    inits = [None] * cfg.members if init is None else [part.model for part in init.parts()]
    if len(inits) != cfg.members:
        raise ValueError(f"{len(inits)} earlier members for an ensemble of {cfg.members}")
    names = [name] if cfg.members == 1 else [f"{name} {k + 1}/{cfg.members}" for k in range(cfg.members)]
    started = time.perf_counter()
    jobs = min(jobs, cfg.members)
    if jobs > 1:
        threads = max(1, torch.get_num_threads() // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_end_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futures = [
                pool.submit(_fit_in_process, threads, n, data, c, init=i)
                for n, c, i in zip(names, configs, inits, strict=True)
            ]
            members = [f.result() for f in futures]
    else:
        members = [fit(n, data, c, init=i) for n, c, i in zip(names, configs, inits, strict=True)]
    if cfg.members == 1:
        return members[0]
    return FitResult(
        join_members([m.model for m in members], cfg),
        cfg,
        seconds=time.perf_counter() - started,
        members=members,
    )
