"""The locked set (.ci/requirements.lock): it satisfies pyproject.toml's ranges, holds every
dependency of memray and its extras, and is what every cluster node installs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / ".ci" / "requirements.lock"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[_canonical(name)] = version
    return pins


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(text) for text in texts]


def test_the_lock_satisfies_every_range_of_pyproject():
    pins = _lock()
    for requirement in _project_requirements():
        name = _canonical(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}"


def test_cluster_nodes_install_the_lock_on_the_locks_ray():
    """Every node runs Ray's image of the lock's Ray and installs the locked set on it: the
    `ray up` cluster in its set-up commands, the KubeRay cluster through launch/Dockerfile."""
    ray_version = _lock()["ray"]
    cluster = yaml.safe_load((REPO / "launch" / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    assert "pip install -q -c ~/memray/.ci/requirements.lock -e ~/memray" in cluster["setup_commands"]
    assert cluster["file_mounts"]["~/memray"] == "."
    dockerfile = (REPO / "launch" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_version}-py311-gpu\n" in dockerfile
    assert 'pip install --no-cache-dir -c .ci/requirements.lock -e ".[cluster]"' in dockerfile
    job, _ = yaml.safe_load_all((REPO / "launch" / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    runtime_env = yaml.safe_load((REPO / "launch" / "runtime-env.yaml").read_text())
    assert "pip" not in runtime_env  # the nodes' packages; `launch/submit --pip` adds the lock


def test_check_lock_names_a_package_installed_at_another_version(tmp_path):
    """.ci/setup fails when the environment differs from the lock (a dependency the lock lacks,
    or one at another version): the check it runs, on this environment and a changed lock."""
    pins = _lock()
    changed = tmp_path / "changed.lock"
    lines = [f"{name}=={'0.0.1' if name == 'peft' else version}" for name, version in pins.items() if name != "filelock"]
    changed.write_text("\n".join(lines) + "\n")
    check = subprocess.run([sys.executable, str(REPO / ".ci" / "check-lock"), str(changed), "test"],
                           capture_output=True, text=True)
    assert check.returncode == 1
    assert f"peft {metadata.version('peft')} is installed but {changed} pins 0.0.1" in check.stderr
    assert f"filelock {metadata.version('filelock')} is installed but not in {changed}" in check.stderr
