"""The service under test: where it is, its process tree's CPU and memory, and spawning it.

A benchmark either drives a running service (``--url``, checked to be on loopback) or starts
``clickrank serve`` itself per :class:`Variant` (``--spawn``) as a :class:`SpawnedServer`. CPU and RSS
figures come from ``/proc`` and cover the whole process tree (uvicorn ``--workers`` N runs N children).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def check_loopback(url: str) -> str:
    """``url`` without its trailing slash, if it is plain HTTP on loopback; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"bench only drives a service on loopback (http://127.0.0.1:PORT), not {url!r}")
    return url.rstrip("/")


@dataclass
class Target:
    """A service under test: its base URL and, when known, its pid (for CPU and RSS figures)."""

    url: str
    pid: int | None = None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn ``--workers`` N runs N child processes)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        with suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                stack.extend(
                    int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()
                )
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def stat_fields(pid: int, tid: int | None = None) -> list[str]:
    """``/proc/PID/stat``, or with ``tid`` the thread's own ``/proc/PID/task/TID/stat`` (``/proc/TID/stat``
    would sum its whole process), from its third field on (state, ppid, …): what follows the command name,
    which may itself hold spaces and parentheses. Raises OSError once the process or thread is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return Path(path).read_text().rsplit(")", 1)[1].split()


def _cpu_ticks(fields: list[str]) -> int:
    """utime + stime of ``stat_fields`` (fields 14 and 15 of stat), in clock ticks."""
    return int(fields[11]) + int(fields[12])


def _threads(pid: int) -> Iterator[tuple[int, int]]:
    """(process id, thread id) of every thread of the process and its descendants."""
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            yield p, int(tid)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (ended, not yet reaped)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        with suppress(OSError, ValueError, IndexError):
            total += _cpu_ticks(stat_fields(p))
    return total / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU time of each thread of the process and its descendants, by thread id (the main
    thread's id is its process's pid: in ``clickrank serve`` with one worker, the event loop's thread)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    for p, tid in _threads(pid):
        with suppress(OSError, ValueError, IndexError):
            seconds[tid] = _cpu_ticks(stat_fields(p, tid)) / ticks
    return seconds


def context_switches(pid: int) -> dict[int, int]:
    """Context switches (voluntary + involuntary) of each thread of the process and its descendants, by
    thread id. A thread that waits for the GIL held by another sleeps on a futex: one switch a wait, so
    the count tells how often the event loop and the inference thread hand the GIL to each other, which
    a CPU profile does not show."""
    counts: dict[int, int] = {}
    for p, tid in _threads(pid):
        with suppress(OSError, ValueError):
            lines = Path(f"/proc/{p}/task/{tid}/status").read_text().splitlines()
            counts[tid] = sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
    return counts


def switch_deltas(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    """Each thread's context switches between two ``context_switches`` readings (a thread started in
    between counts from 0)."""
    return {tid: n - before.get(tid, 0) for tid, n in after.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Variant:
    """One service configuration: ``CLICKRANK_*`` variables and the uvicorn worker count."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1


EXTERNAL = Variant("service", {}, 0)
"""The service given with ``--url``: its configuration is not the benchmark's to know (workers: 0)."""


class SpawnedServer:
    """``clickrank serve`` as a subprocess on a free loopback port, ready once ``/readyz`` answers 200."""

    def __init__(
        self,
        variant: Variant,
        *,
        model_dir: Path,
        redis_url: str,
        log_path: Path,
        ready_timeout_s: float = 180.0,
        tree: Path = REPO,
    ) -> None:
        """``tree``: the checkout whose code is served (its working directory and ``PYTHONPATH``)."""
        self.variant = variant
        self.tree = tree
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CLICKRANK_MODEL_DIR": str(model_dir.resolve()),
            "CLICKRANK_REDIS_URL": redis_url,
            "CLICKRANK_LOG_LEVEL": "WARNING",  # no per-request access log in the measured path
            **({} if tree == REPO else {"PYTHONPATH": str(tree.resolve())}),
            **variant.env,
        }
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def target(self) -> Target:
        return Target(self.url, self.pid)

    def __enter__(self) -> SpawnedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "clickrank.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.variant.workers),
        ]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=self.tree,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise ConnectionError(
                        f"clickrank serve exited with status {self.proc.returncode} before it was ready: "
                        f"{self._log_tail()}"
                    )
                try:
                    response = client.get("/readyz")
                except httpx.HTTPError as exc:
                    last = type(exc).__name__  # not listening yet
                else:
                    if response.status_code == 200:
                        return
                    last = response.text[:300]
                    if response.status_code != 503:  # 503 is "still loading"; anything else will not heal
                        raise ConnectionError(f"/readyz answered {response.status_code}: {self._log_tail()}")
                time.sleep(0.2)
        raise ConnectionError(
            f"clickrank serve was not ready after {self.ready_timeout_s:g} s ({last}); "
            f"log: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        with suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            return " | ".join(line[:400] for line in lines) + f" (full log: {self.log_path})"
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's process group (graceful drain), SIGKILL if it is still there after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
