"""Sweeps that lose their driver: `memray run` killed with SIGKILL mid-sweep and then
`memray resume`d (drivers run in subprocesses, as `memray run` would); trials sharing a GPU.
A node lost mid-trial, on a real two-node cluster through launch/submit: test_launch_cluster.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import file_states, read_result, trial_dirs, wait_for, write_small_sweep

pytestmark = pytest.mark.ray  # every test here starts Ray (a driver subprocess)

RUN = "import sys; from memray.sweep import run_sweep; sys.exit(run_sweep(sys.argv[1], storage=sys.argv[2], {extra}))"
RESUME = "import sys; from memray.sweep import resume_sweep; sys.exit(resume_sweep(sys.argv[1]))"
FAKE_KEY = "memray-test-key-" + "0123456789abcdef" * 2  # must never be written anywhere


def _kill_tree(processes: list[psutil.Process]) -> None:
    """SIGKILL each process by pid (those this test started, directly or through Ray)."""
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _descendants(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_driver_killed_mid_sweep_is_resumed_to_the_end(tmp_path):
    path = write_small_sweep(tmp_path, "killed", epochs=3)
    storage = tmp_path / "out"
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY}  # mode offline: a key must still never be written
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-c", RUN.format(extra="num_cpus=2"), str(path), str(storage)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    folder = storage / "killed"

    def one_done_one_running() -> bool:
        if not (folder / "sweep.yaml").is_file():
            return False
        states = [read_result(d).get("status") for d in trial_dirs(folder).values()]
        return "success" in states and states.count("success") < len(states)

    try:
        wait_for(one_done_one_running, 300, "a finished trial while others run")
    finally:
        ray_processes = _descendants(driver.pid)
        _kill_tree(ray_processes)  # the driver first: that is the crash under test
        driver.wait()
    time.sleep(2)
    _kill_tree([p for p in ray_processes if p.is_running()])  # Ray processes it left behind
    dirs = trial_dirs(folder)
    finished = {index: file_states(d) for index, d in dirs.items() if read_result(d).get("status") == "success"}
    assert 0 < len(finished) < len(dirs)

    resumed = subprocess.run([sys.executable, "-c", RESUME, str(folder)], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "3 success" in resumed.stdout
    for index, trial_dir in dirs.items():
        result = read_result(trial_dir)
        assert result["status"] == "success"
        assert [row["epoch"] for row in result["epochs"]] == [0, 1, 2, 3]
        if index in finished:
            assert file_states(trial_dir) == finished[index]  # not run again
    # no API key in any file of the sweep folder (configs, results, W&B and Tune logs) or output
    leaked = [p for p in folder.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert FAKE_KEY not in resumed.stdout + resumed.stderr + (tmp_path / "driver.log").read_text()


def test_small_lora_trials_share_one_gpu_four_at_a_time(tmp_path, memray_cache):
    """Default resources on a Ray with one GPU: a quarter GPU per tiny-model LoRA trial, so
    four run at once. The GPU is a logical one here (Ray schedules by it; the trials, seeing
    no CUDA device, train on the CPU)."""
    import ray

    from memray import sweep

    path = tmp_path / "share.yaml"
    path.write_text("""\
name: share
base:
  model: {name: tiny-gpt2}
  data: {dataset: pydoc, max_length: 64, members: 24, nonmembers: 24, validation: 12}
  train: {epochs: 1, batch_size: 8}
  method: {name: lora, rank: 4, lr: 0.003}
  attacks: [loss]
grid:
  seed: [0, 1, 2, 3]
wandb: {mode: disabled}
""")
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        assert "gpus=0.25 [default]" in sweep.dry_run_text(path, address="auto")
        assert sweep.run_sweep(path, storage=str(tmp_path / "out")) == 0
    finally:
        ray.shutdown()
    results = [read_result(d) for d in trial_dirs(tmp_path / "out" / "share").values()]
    assert all(r["status"] == "success" for r in results)
    last_start = max(r["started"] for r in results)
    assert all(r["finished"] > last_start for r in results)  # all four ran at the same time
