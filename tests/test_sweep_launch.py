"""launch/: the cluster YAML passes Ray's own schema, the runtime env and the RayJob carry
no secret, the launch scripts run the project's environment and say how to install what it
lacks, and they validate a sweep before reaching any cluster. The jobs themselves run on a
real two-node cluster in test_launch_cluster.py."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"


def test_cluster_yaml_passes_rays_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((LAUNCH / "cluster.yaml").read_text()))
    validate_config(config)
    gpu_types = [name for name, node in config["available_node_types"].items()
                 if node["node_config"]["InstanceType"].startswith(("g5", "p4d"))]
    assert gpu_types and any(config["available_node_types"][n]["min_workers"] >= 1 for n in gpu_types)
    assert all("RAY_AUTH_MODE=token" in " ".join(config[key])
               for key in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "/mnt/memray" in " ".join(config["initialization_commands"])


def test_runtime_env_is_valid_and_names_secrets_only():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((LAUNCH / "runtime-env.yaml").read_text())
    RuntimeEnv(**runtime_env)  # Ray accepts every field (the packages: test_install.py)
    assert all(re.fullmatch(r"\$\{[A-Z_]+\}", value) for value in runtime_env["env_vars"].values())
    assert set(runtime_env["env_vars"]) == {"WANDB_API_KEY", "HF_TOKEN"}


def test_rayjob_runs_memray_with_token_auth_shared_storage_and_a_secret_key():
    job, claim = yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"], claim["kind"]) == ("ray.io/v1", "RayJob", "PersistentVolumeClaim")
    spec = job["spec"]
    assert spec["jobId"] == job["metadata"]["name"]
    assert spec["entrypoint"].startswith("python -m memray.cli run ") and "--storage /mnt/memray" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert {"name": "memray-storage", "mountPath": "/mnt/memray"} in container["volumeMounts"]
        assert container["image"] == "${MEMRAY_IMAGE}"  # built from launch/Dockerfile
        assert {env["name"] for env in container["env"]} == {"WANDB_API_KEY", "HF_TOKEN"}
        assert all(env["valueFrom"]["secretKeyRef"]["optional"] for env in container["env"])  # Secrets, never inline
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def _jobs():
    """launch/jobs.py as a module."""
    spec = importlib.util.spec_from_file_location("launch_jobs", LAUNCH / "jobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_job_gets_the_submitters_secrets_and_otherwise_the_nodes():
    jobs = _jobs()
    env = jobs.runtime_env(pip=False, environ={"WANDB_API_KEY": "key-from-here", "HF_TOKEN": ""})
    assert env["env_vars"] == {"WANDB_API_KEY": "key-from-here", "HF_TOKEN": "${HF_TOKEN}"}
    assert env["working_dir"] == str(REPO) and "pip" not in env
    packages = jobs.runtime_env(pip=True, environ={})["pip"]["packages"]
    lock = [line for line in (REPO / ".ci" / "requirements.lock").read_text().splitlines()
            if line and not line.startswith("#")]
    assert packages == [pin for pin in lock if not pin.startswith("ray==")] and len(packages) == len(lock) - 1


def test_a_missing_cluster_extra_is_named(monkeypatch):
    jobs = _jobs()
    assert jobs.missing_cluster_extra() == []  # this environment has it (bash .ci/setup)
    real_version = jobs.metadata.version

    def version(name):
        if name.lower().replace("_", "-") in ("aiohttp-cors", "boto3"):
            raise jobs.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(jobs.metadata, "version", version)
    assert sorted(jobs.missing_cluster_extra()) == ["aiohttp_cors (from ray[default])", "boto3"]


def _launch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / args[0]), *args[1:]], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_launch_scripts_without_memray_say_how_to_install(tmp_path):
    """A bare interpreter (the one this environment was made from) has no memray: one line
    naming it and the set-up command, exit code 2."""
    bare = Path(sys.base_prefix) / "bin" / "python3"
    env = {**os.environ, "PYTHON": str(bare), "RAY_ADDRESS": "http://127.0.0.1:9"}
    for script in (["submit", "sweeps/demo.yaml", str(tmp_path)], ["resume", str(tmp_path / "demo")]):
        done = _launch(*script, env=env)
        assert done.returncode == 2
        assert f"{bare} has no memray installed: install with `bash .ci/setup`" in done.stderr


def test_submit_refuses_a_bad_sweep_before_reaching_the_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase: {method: {name: lora, placement: mlpp}}\n")
    env = {**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": "http://127.0.0.1:9"}  # nothing listens there
    done = _launch("submit", str(bad), str(tmp_path), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"memray: error: {bad}") and "method.placement" in done.stderr
    assert "Traceback" not in done.stderr
