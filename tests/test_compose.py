"""docker-compose.yml, without a Docker engine: the file is checked against the official
compose-spec JSON schema, then every service's command and health check from it is run against
the local PostgreSQL and Redis, as the containers would run them.

What stands in for Docker (and is all the test changes): the values are interpolated from
:data:`COMPOSE_ENV`; the host names ``postgres`` and ``redis`` become the local servers, the
database a scratch one, Redis databases 0/1/2 a private slot (RedBeat shares the broker's); each
replica gets a container host name of its own (``worker-1``…: ``%h`` in its command, ``HOSTNAME``
for its health check); Flower's port and the metrics ports are free local ones, since every
container here shares one host, and the metrics listen on loopback (in a container: on the compose
network); reservations expire every 2 s instead of 60, so beat has something to send within the
test. The images (``postgres:15``, ``redis:7``) are not run: their health checks are run against
the local servers.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml
from celery import Celery

from tests.devenv import Scratch
from tests.polling import wait_for
from tests.support import ROOT
from tests.test_ops import run_promtool
from token_worker_client.signing import Signer, sign_messages
from worker.config import celery_config
from worker.settings import Settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
BIN = Path(sys.executable).parent
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "compose-test",
    "TOKENS_WORKER_DB_PASSWORD": "compose-test-worker",
    "REDIS_PASSWORD": "compose-test-redis",
    "TOKENS_WORKER_KEY": "compose-test-worker-key-0123456789abcdef",
    "TOKENS_WEB_KEY": "compose-test-web-key-0123456789abcdef0123",
    "TOKENS_BILLING_KEY": "compose-test-billing-key-0123456789abcdef",
    "FLOWER_BASIC_AUTH": "ops:compose-test",
}
OUR_IMAGE = "token-worker:local"


def compose_schema() -> dict[str, Any]:
    """The compose-spec schema (compose-spec/compose-spec, schema/compose-spec.json) as
    check-jsonschema vendors it."""
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendored.joinpath("compose-spec.json").read_text())
    return schema


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation, for the forms the file uses: ``$$``, ``${V}``, ``${V:-default}``,
    ``${V-default}``, ``${V:?error}``, ``${V?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2), m.group(3) or "", m.group(4)
        found = env.get(name)
        if op.startswith(":") and found == "":
            found = None
        if found is not None:
            return found
        if op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op.endswith("-") else ""

    return _VARIABLE.sub(substitute, value)


def raw_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def compose() -> dict[str, Any]:
    document: dict[str, Any] = interpolate(raw_compose(), COMPOSE_ENV)
    return document


# --- the file ----------------------------------------------------------------------------------


def test_the_file_follows_the_compose_spec() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    assert [e.message for e in validator.iter_errors(compose())] == []
    # Strict enough to catch a slip: a misspelt key, a condition compose does not know.
    slips: list[tuple[str, ...]] = [
        ("worker", "healthcheck", "intervall"),
        ("beat", "depends_on", "migrate", "condition"),
    ]
    for *path, key in slips:
        broken = compose()
        node = broken["services"]
        for step in path:
            node = node[step]
        node[key] = "30s"
        assert list(validator.iter_errors(broken)), path


def test_every_service_restarts_and_our_long_running_ones_report_health() -> None:
    services = compose()["services"]
    assert all("restart" in s for s in services.values())
    assert services["migrate"]["restart"] == "no"  # a one-off; --wait does its retrying
    assert {n for n, s in services.items() if s["restart"] == "unless-stopped"} == set(services) - {
        "migrate"
    }
    assert {n for n, s in services.items() if "healthcheck" in s} == set(services) - {"migrate"}
    assert services["migrate"]["command"][:4] == ["tokens", "migrate", "--wait", "60"]
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_one_image_built_once() -> None:
    services = compose()["services"]
    ours = {n for n, s in services.items() if s.get("image") == OUR_IMAGE}
    assert ours == {"migrate", "worker", "worker-renewals", "beat", "flower"}
    assert [n for n, s in services.items() if "build" in s] == ["migrate"]
    assert all(services[n]["pull_policy"] == "never" for n in ours - {"migrate"})
    # The other services start only after migrate, so after the image is built.
    for name in ours - {"migrate"}:
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_workers_serve_metrics() -> None:
    services = compose()["services"]
    for name in ("worker", "worker-renewals"):
        assert services[name]["environment"]["TOKENS_METRICS_PORT"] == "9808"
        assert services[name]["expose"] == ["9808"]


def test_metrics_are_reachable_on_the_compose_network_only() -> None:
    # The listener binds loopback unless told otherwise; Prometheus scrapes each worker container
    # over the compose network, so every container that serves metrics names the address, and
    # none publishes the port on the host.
    services = compose()["services"]
    serving = {n for n, s in services.items() if "TOKENS_METRICS_PORT" in s.get("environment", {})}
    assert serving == {"worker", "worker-renewals"}
    for name in serving:
        assert services[name]["environment"]["TOKENS_METRICS_ADDR"] == "0.0.0.0", name
        assert "ports" not in services[name], name


def compose_variables(value: Any) -> dict[str, str]:
    """Every ``${VAR…}`` the file interpolates (comments are not read), each with its operator
    (``:-``, ``-``, ``:?``, ``?`` or empty)."""
    if isinstance(value, dict):
        return {k: op for v in value.values() for k, op in compose_variables(v).items()}
    if isinstance(value, list):
        return {k: op for v in value for k, op in compose_variables(v).items()}
    if not isinstance(value, str):
        return {}
    return {m.group(2): m.group(3) or "" for m in _VARIABLE.finditer(value) if m.group(2)}


def env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name: value for name, value in pairs}


def test_env_example_lists_every_variable_compose_reads() -> None:
    read = compose_variables(raw_compose())
    example = env_example()
    assert set(example) == set(read)
    # Secrets are placeholders that say so; a variable with a default shows that default, so a
    # copied .env changes nothing but the secrets.
    for name, op in read.items():
        if op.endswith("?"):
            assert example[name].split(":")[-1].startswith("change-me"), name
    defaults = {
        m.group(2): m.group(4)
        for m in _VARIABLE.finditer(COMPOSE_FILE.read_text())
        if m.group(3) in {":-", "-"}
    }
    assert defaults and all(example[name] == default for name, default in defaults.items())
    # With the example as the environment the file interpolates and follows the spec.
    validator = jsonschema.Draft202012Validator(compose_schema())
    assert [e.message for e in validator.iter_errors(interpolate(raw_compose(), example))] == []


def test_published_ports_are_on_loopback_only() -> None:
    services = compose()["services"]
    published = {n: s["ports"] for n, s in services.items() if "ports" in s}
    # Flower and Prometheus for operators; never PostgreSQL or Redis (producers join the
    # network), never the workers' metrics.
    assert set(published) == {"flower", "prometheus"}
    for name, ports in published.items():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), (name, ports)


def test_prometheus_finds_every_worker_replica() -> None:
    # A static "worker:9808" target is one address per scrape, so one replica; DNS service
    # discovery makes each A record (one per replica) a target of its own.
    services = compose()["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "token-worker"]
    assert "static_configs" not in job
    (discovery,) = job["dns_sd_configs"]
    serving = {n for n, s in services.items() if "TOKENS_METRICS_PORT" in s.get("environment", {})}
    assert discovery["type"] == "A"
    assert set(discovery["names"]) == serving
    for name in serving:
        assert services[name]["environment"]["TOKENS_METRICS_PORT"] == str(discovery["port"])
    assert services["worker"]["deploy"]["replicas"] > 1
    prometheus = services["prometheus"]
    assert "./ops/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert config["rule_files"] == ["alerts.yml"]  # beside it, in the same mounted folder
    checked = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert "is valid prometheus config file" in checked
    assert f"Checking {PROMETHEUS_CONFIG.parent / 'alerts.yml'}" in checked  # found, checked


# --- the stack, run -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Container:
    """One replica of a compose service, as a process group on this host."""

    service: str
    hostname: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)

    def start(self, cwd: Path) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check(self) -> subprocess.CompletedProcess[str]:
        """The service's health check, run as Docker runs it inside the container."""
        return run_check(self.healthcheck, self.env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def run_check(test: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    kind, *rest = test
    argv = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
    assert kind in {"CMD", "CMD-SHELL"}, test
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Stack:
    scratch: Scratch
    containers: dict[str, list[Container]]
    migrated: subprocess.CompletedProcess[str]
    failed_before: dict[str, subprocess.CompletedProcess[str]]
    base_env: dict[str, str]

    def one(self, service: str) -> Container:
        (container,) = self.containers[service]
        return container

    def all(self) -> list[Container]:
        return [c for cs in self.containers.values() for c in cs]

    def flower(self, path: str) -> bytes:
        flower = self.one("flower")
        token = base64.b64encode(flower.env["FLOWER_BASIC_AUTH"].encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{flower.env['FLOWER_PORT']}{path}",
            headers={"Authorization": f"Basic {token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body: bytes = response.read()
            return body

    def flower_tasks(self) -> dict[str, dict[str, Any]]:
        tasks: dict[str, dict[str, Any]] = json.loads(self.flower("/api/tasks"))
        return tasks


def mapped(value: str, scratch: Scratch) -> str:
    """A compose URL pointing at the scratch database or Redis slot on this host."""
    if value.startswith("postgresql") and "@postgres:5432/" in value:
        # As the role the URL names (trust authentication here: its password is not checked).
        if value.startswith("postgresql+psycopg://tokens_worker:"):
            as_worker = scratch.database_url.replace("://postgres@", "://tokens_worker@", 1)
            assert "://tokens_worker@" in as_worker, scratch.database_url
            return as_worker
        return scratch.database_url
    # The local Redis has no password: the stack's is dropped from its URLs.
    m = re.fullmatch(r"redis://(?::[^@]*@)?redis:6379/(\d+)", value)
    if m:
        # Databases 0 and 1 are the broker's and the backend's; RedBeat (2) shares the broker's.
        slot = {0: scratch.broker_url, 1: scratch.backend_url, 2: scratch.broker_url}
        return slot[int(m.group(1))]
    assert "redis:" not in value and "postgres:" not in value, value
    return value


def container_env(
    base: dict[str, str], service: dict[str, Any], scratch: Scratch
) -> dict[str, str]:
    env = {**base, **{k: mapped(str(v), scratch) for k, v in service["environment"].items()}}
    if "TOKENS_METRICS_PORT" in env:
        env["TOKENS_METRICS_PORT"] = str(free_port())
        env["TOKENS_METRICS_ADDR"] = "127.0.0.1"
    if "FLOWER_PORT" in env:
        env["FLOWER_PORT"] = str(free_port())
    env["TOKENS_RESERVATION_EXPIRY_SECONDS"] = "2"
    return env


STALE_BINDING = ("_kombu.binding.celery", "celery\x06\x16\x06\x16renewals")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """migrate, then every other service of ours with its replicas; yields once every health
    check passes."""
    here = tmp_path_factory.mktemp("compose")
    services = compose()["services"]
    scratch = Scratch("tokens_compose")
    scratch.create()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    containers: dict[str, list[Container]] = {}
    try:
        migrate = services["migrate"]
        migrated = subprocess.run(
            migrate["command"],
            cwd=here,
            env=container_env(base, migrate, scratch),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr
        # A binding an earlier release declared, which workers must drop when they start.
        broker = redis.Redis.from_url(mapped("redis://redis:6379/0", scratch))
        broker.sadd(*STALE_BINDING)

        for name in ("worker", "worker-renewals", "beat", "flower"):
            service = services[name]
            replicas = service.get("deploy", {}).get("replicas", 1)
            containers[name] = []
            for i in range(1, replicas + 1):
                hostname = f"{name}-{i}"
                env = {**container_env(base, service, scratch), "HOSTNAME": hostname}
                containers[name].append(
                    Container(
                        service=name,
                        hostname=hostname,
                        argv=[a.replace("%h", hostname) for a in service["command"]],
                        env=env,
                        healthcheck=service["healthcheck"]["test"],
                        log=here / f"{hostname}.log",
                    )
                )
        with ThreadPoolExecutor(max_workers=8) as pool:
            # Each check must be able to fail: before the processes it checks exist, and for
            # a container whose worker is not there.
            absent = {**containers["worker"][0].env, "HOSTNAME": "worker-absent"}
            worker_absent = pool.submit(
                run_check, services["worker"]["healthcheck"]["test"], absent
            )
            failed_before = {
                "beat": containers["beat"][0].check(),
                "flower": containers["flower"][0].check(),
            }
            for c in [c for cs in containers.values() for c in cs]:
                c.start(here)
            healthy: list[Future[None]] = [
                pool.submit(wait_until_healthy, c) for cs in containers.values() for c in cs
            ]
            for future in healthy:
                future.result()
            failed_before["worker"] = worker_absent.result()
        yield Stack(scratch, containers, migrated, failed_before, base)
    finally:
        for cs in containers.values():
            for c in cs:
                c.stop()
        for c in [c for cs in containers.values() for c in cs]:  # shown when a test failed
            print(f"--- {c.hostname}\n{c.output()[-2000:]}")
        scratch.destroy()


def wait_until_healthy(container: Container, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert container.running(), f"{container.hostname} exited:\n{container.output()[-3000:]}"
        checked = container.check()
        if checked.returncode == 0:
            return
        container.notes.append(checked.stderr.strip()[-300:])
        if time.monotonic() > deadline:
            raise AssertionError(f"{container.hostname} not healthy: {container.notes[-3:]}")
        time.sleep(0.5)


def producer(stack: Stack, name: str = "billing") -> Celery:
    """A producer that knows only the contract: the broker and backend URLs, and its signing
    key (``TOKENS_PRODUCERS`` is on in the stack)."""
    env = stack.one("flower").env
    app = Celery(
        "producer",
        broker=env["TOKENS_BROKER_URL"],
        backend=env["TOKENS_RESULT_BACKEND"],
        set_as_current=False,
    )
    key = COMPOSE_ENV[{"billing": "TOKENS_BILLING_KEY", "web": "TOKENS_WEB_KEY"}[name]]
    sign_messages(app, Signer(name, key.encode()))
    return app


def test_every_health_check_passes_and_can_fail(stack: Stack) -> None:
    assert "schema up to date" in stack.migrated.stdout
    for container in stack.all():
        checked = container.check()
        assert checked.returncode == 0, (container.hostname, checked.stderr)
    for name in ("postgres", "redis"):  # the images' own checks, against the local servers
        test = compose()["services"][name]["healthcheck"]["test"]
        checked = run_check(test, stack.base_env)
        assert checked.returncode == 0, (name, checked.stdout, checked.stderr)
    before = stack.failed_before
    assert before["beat"].returncode == 1 and "no schedule" in before["beat"].stderr
    assert before["flower"].returncode == 1 and "unreachable" in before["flower"].stderr
    assert before["worker"].returncode != 0


def test_debits_and_sweeps_run_on_their_own_workers(stack: Stack) -> None:
    app = producer(stack)
    opened = app.send_task("tokens.open_account", kwargs={"user_id": "c1", "initial_balance": 50})
    assert opened.get(timeout=30)["created"] is True
    debit = app.send_task(
        "tokens.debit", kwargs={"user_id": "c1", "amount": 7, "operation_type": "sora_image"}
    )
    assert debit.get(timeout=30)["new_balance"] == 43
    # The worker's own routing sends a sweep to `renewals`, served by worker-renewals only.
    ours = Celery("ours", set_as_current=False)
    env = stack.one("flower").env
    ours.config_from_object(
        celery_config(
            Settings(
                database_url=env["TOKENS_DATABASE_URL"],
                broker_url=env["TOKENS_BROKER_URL"],
                result_backend=env["TOKENS_RESULT_BACKEND"],
            )
        )
    )
    sign_messages(ours, Signer("billing", COMPOSE_ENV["TOKENS_BILLING_KEY"].encode()))
    sweep = ours.send_task("renewals.sweep", kwargs={})
    swept = sweep.get(timeout=60)
    assert (swept["successful"], swept["failed"]) == (1, 0)
    # The sweep plans, then replaces itself with its chunks (`<id>:0`…) and a totals task that
    # answers under the sweep's own id.
    ids = [debit.id, sweep.id, f"{sweep.id}:0"]

    def all_done() -> dict[str, dict[str, Any]] | None:
        tasks = stack.flower_tasks()
        done = all(tasks.get(i, {}).get("state") == "SUCCESS" for i in ids)
        return tasks if done else None

    tasks = wait_for(all_done, 30, "Flower seeing the debit and the sweep's tasks succeed")
    assert tasks is not None
    assert tasks[debit.id]["worker"] in {"worker@worker-1", "worker@worker-2"}
    by_worker: dict[str, set[str]] = {}
    for task in tasks.values():
        if task.get("worker"):
            by_worker.setdefault(task["worker"].split("@")[0], set()).add(task.get("name") or "")
    assert by_worker["renewals"] and all(n.startswith("renewals.") for n in by_worker["renewals"])
    assert not any(n.startswith("renewals.") for n in by_worker["worker"]), by_worker


def test_only_signed_producers_move_money(stack: Stack) -> None:
    """TOKENS_PRODUCERS is on in the stack: unsigned, or outside a producer's tasks, a message
    changes nothing and gets UNAUTHORIZED (contract v1.2)."""
    env = stack.one("flower").env
    unsigned = Celery(
        "unsigned", broker=env["TOKENS_BROKER_URL"], backend=env["TOKENS_RESULT_BACKEND"]
    )
    kwargs = {"user_id": "c-auth", "amount": 5}
    out = unsigned.send_task("tokens.credit", kwargs=kwargs).get(timeout=30)
    assert (out["error_code"], out["error"]) == ("UNAUTHORIZED", "Unsigned message")
    web = producer(stack, "web")
    out = web.send_task("tokens.credit", kwargs=kwargs).get(timeout=30)
    assert out["error"] == "Producer web may not send tokens.credit"
    balance = web.send_task("tokens.get_balance", kwargs={"user_id": "c-auth"}).get(timeout=30)
    assert balance["error_code"] == "USER_NOT_FOUND"  # web may read; nothing was credited


def test_each_message_reaches_one_queue(stack: Stack) -> None:
    # Workers dropped the binding that copied every default-queue message to `renewals`.
    broker = redis.Redis.from_url(stack.one("flower").env["TOKENS_BROKER_URL"])
    assert not broker.sismember(*STALE_BINDING)
    assert broker.smembers("_kombu.binding.celery") == {b"celery\x06\x16\x06\x16celery"}
    assert broker.smembers("_kombu.binding.renewals") == {b"renewals\x06\x16\x06\x16renewals"}


def test_two_beats_one_sends(stack: Stack) -> None:
    beats = stack.containers["beat"]

    def expiries_run() -> int:
        tasks = stack.flower_tasks().values()
        return sum(t["name"] == "reservations.expire" and t["state"] == "SUCCESS" for t in tasks)

    wait_for(lambda: expiries_run() >= 2, 30, "two scheduled reservations.expire run")
    assert all(b.running() for b in beats)
    senders = [b for b in beats if "Sending due task reservations-expire" in b.output()]
    assert len(senders) == 1
    assert ["beat: Acquired lock" in b.output() for b in beats].count(True) == 1


def test_flower_lists_tasks_with_kwargs_and_results(stack: Stack) -> None:
    app = producer(stack)
    sent = app.send_task("tokens.get_balance", kwargs={"user_id": "nobody"})
    assert sent.get(timeout=30)["error_code"] == "USER_NOT_FOUND"

    def listed() -> dict[str, Any] | None:
        task = stack.flower_tasks().get(sent.id)
        return task if task and task.get("state") == "SUCCESS" else None

    task = wait_for(listed, 30, "Flower listing the task")
    assert task is not None
    assert task["name"] == "tokens.get_balance"
    assert "'user_id': 'nobody'" in task["kwargs"]
    assert "USER_NOT_FOUND" in task["result"]
    page = stack.flower("/tasks").decode()
    for slug, label in (("kwargs", "kwargs"), ("result", "Result"), ("args", "args")):
        assert f'<th data-column="{slug}">{label}</th>' in page


def test_compose_interpolation() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$${HOSTNAME} ${SET} ${NOPE:-d} ${EMPTY:-d} ${EMPTY-d}", env) == (
        "${HOSTNAME} x d d "
    )
    with pytest.raises(KeyError, match="set it"):
        interpolate("${NOPE:?set it}", env)


def test_every_worker_answers_on_its_metrics_port(stack: Stack) -> None:
    # After the debits and the sweep above (or on their own): each worker container serves
    # Prometheus text on TOKENS_METRICS_PORT, counting what its own pool processes did.
    app = producer(stack)
    assert app.send_task("health.ping").get(timeout=30)["success"] is True
    workers = [c for c in stack.all() if "TOKENS_METRICS_PORT" in c.env]
    assert len(workers) == 3  # two debit workers and the renewals worker
    for container in workers:
        url = f"http://127.0.0.1:{container.env['TOKENS_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        assert "# TYPE tokens_operations_total counter" in text, container.hostname
        assert "celery_queue_length" in text, container.hostname
