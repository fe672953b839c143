"""A private ``redis-server`` on a free loopback port, and a private Redis Cluster of several: for the replay
evaluation, the test suite and the load tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port(below: int = 65536, *, bus_offset: int = 0) -> int:
    """A free loopback port under ``below``; with ``bus_offset``, one whose port + bus_offset is free too
    (a cluster node listens on both: a taken bus port aborts the node)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below and (not bus_offset or _bindable(port + bus_offset)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RedisProcess:
    """A private ``redis-server`` (no persistence) in ``workdir`` on a free loopback port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH (the replay runs a private one)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise OSError(f"redis-server did not start on port {self.port} (see {self.workdir / 'redis.log'})")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to replicas or clients."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @contextmanager
    def running(self) -> Iterator[RedisProcess]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class RedisClusterProcess:
    """A private Redis Cluster on loopback: ``primaries`` primaries with ``replicas`` replicas each, one
    ``redis-server --cluster-enabled yes`` per node in ``workdir/<port>``, joined by
    ``redis-cli --cluster create``. Replicas never migrate, so a killed primary's replica takes its slots."""

    def __init__(
        self, workdir: Path, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.workdir = Path(workdir)
        self.primaries, self.replicas = primaries, replicas
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms)]
        args += ["--cluster-migration-barrier", "999", "--repl-diskless-sync-delay", "0"]
        # A replica stops standing for election once its primary has been gone longer than
        # repl-ping-replica-period + node timeout × this factor (20 s here); on a loaded machine the first
        # elections can all fail within that, and the slots then stay unserved for good.
        args += ["--cluster-replica-validity-factor", "0"]
        self.nodes: list[RedisProcess] = []
        for _ in range(primaries * (1 + replicas)):
            port = free_port(below=55536, bus_offset=10000)  # a node's bus port is its port + 10000
            node_args = [*args, "--cluster-config-file", f"nodes-{port}.conf"]
            self.nodes.append(RedisProcess(self.workdir / str(port), port, node_args))

    @property
    def url(self) -> str:
        """Any node's URL: the cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas)]
        subprocess.run([*create, "--cluster-yes"], check=True, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.healthy(self.replicas):
            if time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the Redis Cluster in {self.workdir} did not become healthy")
            time.sleep(0.1)

    def cli(self, port: int, *command: str) -> str:
        """One ``redis-cli`` command to the node on ``port``; its output."""
        out = subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, timeout=10)
        return out.stdout.decode()

    def healthy(self, replicas: int = 0) -> bool:
        """Every live node says the cluster is ok, every primary's replicas are in sync with it, and each
        primary has at least ``replicas`` of them."""
        live = [node for node in self.nodes if node.proc is not None]
        if not all("cluster_state:ok" in self.cli(node.port, "cluster", "info") for node in live):
            return False
        for port in self.primary_ports():
            info = self.cli(port, "info", "replication")
            listed = [row for row in info.splitlines() if row.startswith("slave") and "ip=" in row]
            in_sync = [row for row in listed if "state=online" in row]
            if len(in_sync) != len(listed) or len(in_sync) < replicas:
                return False
        return True

    def describe(self, log_lines: int = 5) -> str:
        """What a failing cluster test prints: the first live node's ``CLUSTER NODES``, and each live node's
        role and replication link (``INFO replication``'s first lines) and the last ``log_lines`` lines of
        its log (where a replica says why it does not stand for election)."""
        lines = [self.cli(self._live_port(), "cluster", "nodes").strip()]
        for node in self.nodes:
            if node.proc is not None:
                info = [row for row in self.cli(node.port, "info", "replication").splitlines() if ":" in row]
                lines.append(f"{node.port}: " + ", ".join(info[:4]))
                log_file = node.workdir / "redis.log"
                if log_file.exists():
                    tail = log_file.read_text(errors="replace").splitlines()[-log_lines:]
                    lines += [f"  {row}" for row in tail]
        return "\n".join(lines)

    def primary_ports(self) -> list[int]:
        """Ports of the nodes that are primaries now (as the first live node sees it)."""
        rows = self.cli(self._live_port(), "cluster", "nodes").splitlines()
        return [
            int(row.split()[1].split(":")[1].split("@")[0])
            for row in rows
            if "master" in row.split()[2] and "fail" not in row.split()[2]
        ]

    def _live_port(self) -> int:
        return next(node.port for node in self.nodes if node.proc is not None)

    def node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        slot = self.cli(self._live_port(), "cluster", "keyslot", key).strip()
        for port in self.primary_ports():
            for row in self.cli(port, "cluster", "nodes").splitlines():
                fields = row.split()
                if "myself" in fields[2]:
                    for span in fields[8:]:
                        low, _, high = span.partition("-")
                        if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                            return port
        raise LookupError(f"no primary serves slot {slot}")

    def flushall(self) -> None:
        for port in self.primary_ports():
            self.cli(port, "flushall")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @contextmanager
    def running(self) -> Iterator[RedisClusterProcess]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
