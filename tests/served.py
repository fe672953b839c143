"""``clickrank serve`` as a real subprocess on a free loopback port, for the tests that need a real
server process (signals, several workers, live model swaps)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from models.redis_process import free_port


class Service:
    """``python -m clickrank.cli serve`` on a free loopback port, configured by CLICKRANK_* variables;
    its log (stderr, JSON lines) goes to a file."""

    def __init__(self, workdir: Path, settings: dict[str, str]) -> None:
        self.workdir = workdir
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = workdir / "serve-0.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_within_s: float = 30.0) -> None:
        """Start a fresh process (a new port, a new log file) and wait until ``/readyz`` says ready."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.port = free_port()
        self.log_path = self.workdir / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKRANK_")}
        env |= {f"CLICKRANK_{k.upper()}": v for k, v in self.settings.items()}
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "clickrank.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port)]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + ready_within_s
        while True:
            assert self.proc.poll() is None, f"clickrank serve exited: {self.log_tail()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {ready_within_s}s: {self.log_tail()}"
            time.sleep(0.1)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS in /proc status")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGKILL to the whole process group: uvicorn's worker processes too, even when a test has
        already killed the parent (they would outlive the test otherwise)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def log_records(self) -> list[dict[str, Any]]:
        """Every line of the log, parsed (the test fails on a line that is not a JSON object)."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
