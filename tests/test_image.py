"""requirements.lock, the image's pinned dependencies (Dockerfile): it covers everything the
image installs, agrees with pyproject.toml, and is what this test run itself runs on (``make
install`` installs under it as constraints)."""

from __future__ import annotations

import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT


def locked(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def image_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["ops"]
    # token-worker-client is ./client, installed beside the worker, not pinned from an index.
    return [r for r in map(Requirement, declared) if r.name != "token-worker-client"]


def test_the_lock_pins_what_pyproject_asks_for() -> None:
    assert_pins_what_pyproject_asks_for(locked())


def assert_pins_what_pyproject_asks_for(pins: dict[str, str]) -> None:
    for requirement in image_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} missing from requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])
        for extra in requirement.extras:  # celery[redis,sqlalchemy] brings these
            for dep in metadata.requires(requirement.name) or []:
                wanted = Requirement(dep)
                if wanted.marker and wanted.marker.evaluate({"extra": extra}):
                    assert canonicalize_name(wanted.name) in pins, (requirement, wanted)


def test_the_lock_is_closed_under_dependencies() -> None:
    """Every dependency of a locked package is locked too, so `pip install -r` resolves nothing
    of its own."""
    pins = locked()
    for name in pins:
        for dep in metadata.requires(name) or []:
            wanted = Requirement(dep)
            if wanted.marker is None or wanted.marker.evaluate({"extra": ""}):
                assert canonicalize_name(wanted.name) in pins, (name, wanted)


def test_the_tests_run_on_the_locked_versions() -> None:
    installed = {name: metadata.version(name) for name in locked()}
    assert installed == locked()


def test_make_lock_writes_a_fresh_lock(tmp_path: Path) -> None:
    """The refresh command: a clean venv's resolution of the image's dependencies, pinned."""
    fresh = tmp_path / "requirements.lock"
    subprocess.run(["make", f"LOCK={fresh}", "lock"], cwd=ROOT, check=True, timeout=600)
    pins = locked(fresh)
    assert_pins_what_pyproject_asks_for(pins)
    assert pins.keys() == locked().keys()  # the same packages; versions move as releases do
    assert "token-worker" not in pins


def test_the_image_installs_the_lock_before_the_code() -> None:
    steps = [
        line
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith(("COPY", "RUN", "USER", "CMD"))
    ]
    lock = steps.index("RUN pip install -r requirements.lock")
    assert steps[lock - 1] == "COPY requirements.lock ./"
    # The code after it, the worker with its own client, adding no dependency of its own.
    code = steps.index("RUN pip install --no-deps '.' && pip check")
    assert lock < steps.index("COPY client ./client") < code
    # The image runs as a user of its own, who owns the embedded default's var directory.
    assert steps.index("RUN install -d -o tokens -g tokens /app/var") < steps.index("USER tokens")
