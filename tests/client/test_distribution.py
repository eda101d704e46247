"""client/ is a distribution of its own: celery and pydantic only, and nothing of the worker.

The proof is the README's own command, ``pip install ./client``, into a fresh virtualenv (no
system site-packages), then a producer that has its own ``models``, ``tasks`` and ``worker``
modules (the names that clashed when producers installed the worker) calling the session's real
worker through the client. pip's cache makes the install take ~20 s once the wheels were fetched.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery import Celery

from tests.client.conftest import urls
from tests.support import ROOT

CLIENT = ROOT / "client"
WORKER_ONLY = {"sqlalchemy", "psycopg", "alembic", "models", "tasks", "worker", "accounting"}


def test_the_client_imports_only_the_standard_library_celery_kombu_and_pydantic() -> None:
    allowed = set(sys.stdlib_module_names) | {"celery", "kombu", "pydantic", "token_worker_client"}
    for path in (CLIENT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


PRODUCER = """
import json, sys
import models, tasks, worker  # the producer's own modules
from token_worker_client import TokenClient

with TokenClient({broker!r}, {backend!r}, timeout=30) as client:
    missing = client.get_balance(user_id="ghost")
    pong = client.ping()
print(json.dumps({{
    "own": [models.OWN, tasks.OWN, worker.OWN],
    "missing": [type(missing).__name__, missing.error_code],
    "ping": type(pong).__name__,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {worker_only!r}),
}}))
"""


@pytest.mark.install
def test_pip_install_client_into_a_fresh_venv_serves_a_producer(
    e2e: Celery, tmp_path: Path
) -> None:
    shutil.copytree(CLIENT, tmp_path / "client", ignore=shutil.ignore_patterns("*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True, timeout=120)
    pip, python = tmp_path / "venv" / "bin" / "pip", tmp_path / "venv" / "bin" / "python"
    # the README's command, run where a clone would have client/
    subprocess.run(
        [pip, "install", "--quiet", "--disable-pip-version-check", "./client"],
        cwd=tmp_path,
        check=True,
        timeout=300,
    )
    listed = subprocess.run(
        [pip, "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        check=True,
        text=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "token-worker-client" in installed
    assert {"celery", "pydantic", "redis"} <= installed
    assert not installed & {"sqlalchemy", "psycopg", "psycopg-binary", "alembic", "fastapi"}
    requires = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.requires('token-worker-client'))"],
        capture_output=True,
        check=True,
        text=True,
    )
    assert requires.stdout.startswith("['celery[redis]")
    assert "'pydantic" in requires.stdout and requires.stdout.count("'") == 8  # these two, and
    assert 'extra == "test"' in requires.stdout  # the test extra (fastapi, httpx), not installed

    app = tmp_path / "app"
    app.mkdir()
    for name in ("models", "tasks", "worker"):
        (app / f"{name}.py").write_text(f"OWN = {name!r}\n")
    broker, backend = urls()
    script = PRODUCER.format(broker=broker, backend=backend, worker_only=WORKER_ONLY)
    ran = subprocess.run(
        [python, "-c", textwrap.dedent(script)],
        cwd=app,
        capture_output=True,
        check=True,
        text=True,
        timeout=120,
    )
    assert json.loads(ran.stdout) == {
        "own": ["models", "tasks", "worker"],
        "missing": ["Failure", "USER_NOT_FOUND"],
        "ping": "PingOut",
        "loaded": ["models", "tasks", "worker"],  # the producer's own, and nothing else
    }
