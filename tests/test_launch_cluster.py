"""launch/submit and launch/resume against a real two-node Ray cluster started here with
`ray start` (a head and a worker, 1 CPU each, token authentication on, the dashboard's job
API): the sweep runs as a Ray job, its trials get the secrets given at submit time and write
them nowhere, the worker node dies mid-trial and the sweep still ends with every trial done;
a second driver for the same sweep is refused; a resume job after the end re-runs nothing.
Both nodes run this environment, so the job uses its packages (no pip install).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import file_states, read_result, trial_dirs, wait_for, write_small_sweep

pytestmark = pytest.mark.ray  # a real two-node Ray cluster

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
RAY = str(Path(sys.executable).with_name("ray"))  # the `ray` of this environment
FAKE_KEY = "memray-test-wandb-" + secrets.token_hex(16)  # must reach the trials, and never a file
FAKE_HF = "hf_memraytest" + secrets.token_hex(12)


def _kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node started with its own session: every process below it, then its group."""
    try:
        below = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    for child in below:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _ports() -> dict[str, int]:
    """A block of this test's ports: GCS 66xx, dashboard 86xx, the rest in 16000-16999."""
    block = secrets.randbelow(10)
    base = 16000 + 100 * block
    return {"gcs": 6600 + block, "dashboard": 8600 + block, "base": base}


def _node_ports(base: int, node: int) -> list[str]:
    offset = base + 12 * node
    workers = base + 40 + 25 * node
    return [f"--node-manager-port={offset}", f"--object-manager-port={offset + 1}",
            f"--dashboard-agent-listen-port={offset + 2}", f"--dashboard-agent-grpc-port={offset + 3}",
            f"--metrics-export-port={offset + 4}", f"--runtime-env-agent-port={offset + 5}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + 24}"]


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head (1 CPU, the dashboard) and a worker node (1 CPU), token authentication on, each
    `ray start --block` in its own session. Yields (dashboard URL, env with the token, head,
    worker): the `ray start` processes."""
    ports = _ports()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={ports['gcs']}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--ray-client-server-port={ports['base'] + 95}", *_node_ports(ports["base"], 0), *common],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    started = [head]
    try:
        wait_for(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), 90, "the head node")
        worker = subprocess.Popen(
            [RAY, "start", f"--address=127.0.0.1:{ports['gcs']}", *_node_ports(ports["base"], 1), *common],
            env=env, stdout=(tmp_path / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(worker)
        wait_for(lambda: "Ray runtime started" in (tmp_path / "worker.log").read_text(), 90, "the worker node")
        yield f"http://127.0.0.1:{ports['dashboard']}", env, head, worker
    finally:
        for process in reversed(started):
            _kill_node(process)


def _launch(script: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _job(env: dict[str, str], *args: str) -> str:
    """`ray job ARGS` of this environment's Ray: its output (stdout and stderr)."""
    done = subprocess.run([RAY, "job", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _wait_for_job(env: dict[str, str], job_id: str, timeout: float) -> str:
    """Poll `ray job status` until the job ends: "succeeded", "failed" or "was stopped"."""
    ended: list[str] = []

    def has_ended() -> bool:
        found = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", _job(env, "status", job_id))
        ended[:] = [found.group(1)] if found else []
        return bool(ended)

    wait_for(has_ended, timeout, f"job {job_id}")
    return ended[0]


def _trial_processes(nodes: list[subprocess.Popen]) -> list[psutil.Process]:
    """The processes of the Tune trials running on these nodes (their actors)."""
    found = []
    for node in nodes:
        for process in psutil.Process(node.pid).children(recursive=True):
            try:
                if "ray::ImplicitFunc" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
    return found


@pytest.mark.slow  # 5-15 minutes on two busy cores: two Ray nodes, a driver and three trials at once
@pytest.mark.timeout(2400)
def test_submit_runs_a_sweep_through_a_lost_node_with_secrets_from_the_submitter(two_node_cluster, tmp_path):
    dashboard, env, head, worker = two_node_cluster
    submitter = {**env, "RAY_ADDRESS": dashboard, "WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": FAKE_HF,
                 "VIRTUAL_ENV": sys.prefix}  # launch/ scripts run this environment's Python and Ray
    submitter.pop("PYTHON", None)
    write_small_sweep(tmp_path, "launched", epochs=2, wandb_mode="offline")
    done = _launch("submit", "launched.yaml", "out", env=submitter, cwd=tmp_path)  # paths relative to here
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted memray-launched" in done.stdout
    folder = tmp_path / "out" / "launched"
    assert f"the sweep folder is {folder}" in done.stdout

    def two_trials_training() -> bool:  # one per node: each node has 1 CPU
        if not (folder / "sweep.yaml").is_file():
            return False
        results = [read_result(d) for d in trial_dirs(folder).values()]
        return sum(r.get("status") == "running" and len(r.get("epochs", [])) >= 1 for r in results) == 2

    try:
        wait_for(two_trials_training, 900, "two trials past epoch 0")
    except AssertionError as err:
        raise AssertionError(_job(submitter, "logs", "memray-launched")[-5000:]) from err
    trials = _trial_processes([head, worker])
    assert len(trials) == 2
    for process in trials:  # the secrets given at submit time are in every trial's environment
        environ = process.environ()
        assert (environ.get("WANDB_API_KEY"), environ.get("HF_TOKEN")) == (FAKE_KEY, FAKE_HF)

    _kill_node(worker)  # the worker node dies with its trial, which the head then retries

    # one sweep, one driver: neither a second submission nor a resume while it runs
    again = _launch("submit", "launched.yaml", "out", env=submitter, cwd=tmp_path)
    assert again.returncode == 1 and "job memray-launched exists (RUNNING)" in again.stderr
    early = _launch("resume", "out/launched", env=submitter, cwd=tmp_path)
    assert early.returncode == 1 and "job memray-launched is still running" in early.stderr
    assert _wait_for_job(submitter, "memray-launched", 1200) == "succeeded", _job(submitter, "logs", "memray-launched")
    logs = _job(submitter, "logs", "memray-launched")
    assert "3 trials: 3 success" in logs
    results = {index: read_result(d) for index, d in trial_dirs(folder).items()}
    assert all(r["status"] == "success" for r in results.values())
    assert all([row["epoch"] for row in r["epochs"]] == [0, 1, 2] for r in results.values())
    assert sum(r["attempts"] > 1 for r in results.values()) == 1  # the trial of the lost node, retried

    # a resume job after the end runs nothing again
    finished = {index: file_states(d) for index, d in trial_dirs(folder).items()}
    resumed = _launch("resume", "out/launched/", env=submitter, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _wait_for_job(submitter, "memray-launched-resume", 600) == "succeeded"
    resume_logs = _job(submitter, "logs", "memray-launched-resume")
    assert "3 trials: 3 success" in resume_logs
    assert {index: file_states(d) for index, d in trial_dirs(folder).items()} == finished

    # the secrets are in no file of the sweep folder (results, Tune's and W&B's files) and no job log
    leaked = [str(p) for p in folder.rglob("*") if p.is_file()
              and (FAKE_KEY.encode() in p.read_bytes() or FAKE_HF.encode() in p.read_bytes())]
    assert leaked == []
    for text in (logs, resume_logs, done.stdout + done.stderr):
        assert FAKE_KEY not in text and FAKE_HF not in text
    assert json.loads((folder / "sweep.json").read_text())["name"] == "launched"
