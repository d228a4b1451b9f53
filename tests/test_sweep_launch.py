"""launch/: the cluster YAML passes Ray's own schema, the runtime env and the RayJob carry
memray's packages and no secret, and the submit / resume scripts call `ray job` with stable
submission ids (run here against a stand-in `ray` that records its arguments)."""

from __future__ import annotations

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
    assert "WANDB_API_KEY" in runtime_env["env_vars"]


def test_rayjob_runs_memray_with_token_auth_shared_storage_and_a_secret_key():
    job, claim = yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"], claim["kind"]) == ("ray.io/v1", "RayJob", "PersistentVolumeClaim")
    spec = job["spec"]
    assert spec["jobId"] == job["metadata"]["name"]
    assert spec["entrypoint"].startswith("python -m memray.cli run ") and "--storage /mnt/memray" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    launch_env = yaml.safe_load((LAUNCH / "runtime-env.yaml").read_text())
    assert runtime_env["pip"]["packages"] == launch_env["pip"]["packages"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert {"name": "memray-storage", "mountPath": "/mnt/memray"} in container["volumeMounts"]
        assert all("value" not in env for env in container["env"])  # from Secrets, never inline
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that records its arguments; `ray job status` answers $FAKE_JOB_STATUS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    script = bin_dir / "ray"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [ "$1 $2" = "job status" ]; then
    [ -n "$FAKE_JOB_STATUS" ] || exit 1
    echo "Status for job '${{@: -1}}': $FAKE_JOB_STATUS"
fi
""")
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "RAY_ADDRESS": "http://127.0.0.1:8265"}
    return env, calls


def test_submit_validates_then_submits_with_a_stable_id(fake_ray):
    env, calls = fake_ray
    done = subprocess.run([str(LAUNCH / "submit"), "sweeps/demo.yaml", "/mnt/memray", "train.epochs=2"],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    (call,) = calls.read_text().splitlines()
    assert call.startswith("job submit --address http://127.0.0.1:8265 --submission-id memray-demo ")
    assert "--runtime-env launch/runtime-env.yaml" in call
    assert call.endswith("-- python -m memray.cli run sweeps/demo.yaml train.epochs=2 --address auto --storage /mnt/memray")


def test_submit_refuses_a_bad_sweep_before_reaching_the_cluster(fake_ray, tmp_path):
    env, calls = fake_ray
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase: {method: {name: lora, placement: mlpp}}\n")
    done = subprocess.run([str(LAUNCH / "submit"), str(bad), "/mnt/memray"], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and "method.placement" in done.stderr
    assert not calls.exists()


@pytest.mark.parametrize(("status", "submitted"), [("", True), ("SUCCEEDED", True), ("RUNNING", False)])
def test_resume_submits_once_per_sweep(fake_ray, status, submitted):
    env, calls = fake_ray
    done = subprocess.run([str(LAUNCH / "resume"), "/mnt/memray/demo/"], env={**env, "FAKE_JOB_STATUS": status},
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = calls.read_text().splitlines()
    submits = [line for line in lines if line.startswith("job submit")]
    if submitted:
        assert done.returncode == 0, done.stderr
        (call,) = submits
        assert "--submission-id memray-demo-resume " in call
        assert call.endswith("-- python -m memray.cli resume /mnt/memray/demo --address auto")
        assert any(line.startswith("job delete") for line in lines) == bool(status)
    else:
        assert done.returncode == 1 and "still running" in done.stderr and not submits
