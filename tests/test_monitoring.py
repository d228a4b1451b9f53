"""Monitoring through interrupts and resumes: a real `memray run` interrupted with Ctrl-C
(SIGINT to its process group), resumed, killed with `kill -9` (its whole process group,
W&B's processes included, so nothing is flushed), resumed to the end; then every trial's
W&B history (the union of its offline folders) holds every epoch of its result.json
exactly once, under one run id, and every state on the way said what happened.

And what a sweep shows while it runs: piped, one line per trial and epoch and one per
state change (at most 2 + trials x (epochs + 2) lines, epochs counted 0..E, Ray's own
lines included); on a terminal (a pseudo-terminal here), one live table redrawn in place
and a line per failure."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from faults import EPOCH_HOOK_ENV, FAULT_ENV
from helpers import read_result, trial_dirs, wait_for, wandb_runs, write_small_sweep

from memray import sweep
from memray.sweep.wandb import logged_epochs


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`memray ARGS` in a session of its own (its process group is the terminal's, for
    signals), its console output in `log`; the session's MEMRAY_CACHE (conftest)."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "memray.cli", *args, "--num-cpus", "2"], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _epochs(dirs: dict[int, Path]) -> dict[int, list[int]]:
    return {index: [int(row["epoch"]) for row in read_result(d).get("epochs", [])] for index, d in dirs.items()}


def _history_union(folder: Path) -> dict[int, tuple[set[str], list[int]]]:
    """Cell -> (run ids, epochs of every history row of its offline folders, oldest first)."""
    union: dict[int, tuple[set[str], list[int]]] = {}
    for run in wandb_runs(folder / "wandb"):
        ids, epochs = union.setdefault(run["config"]["cell"], (set(), []))
        ids.add(run["id"])
        epochs += [int(row["epoch"]) for row in run["history"] if "epoch" in row]
    return union


@pytest.mark.ray
def test_ctrl_c_then_kill_9_then_resume_leaves_whole_wandb_histories_and_honest_states(tmp_path):
    path = write_small_sweep(tmp_path, "watched", epochs=4, methods=("full", "lora"))
    folder = tmp_path / "results" / "watched"
    started: list[subprocess.Popen] = []
    try:
        _interrupt_kill_and_resume(path, folder, tmp_path, started)
    finally:
        for process in started:  # whatever failed: no driver, Ray or W&B process of this test left
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def _interrupt_kill_and_resume(path: Path, folder: Path, tmp_path: Path, started: list[subprocess.Popen]) -> None:
    driver = _start(["run", str(path)], tmp_path, tmp_path / "run.log")
    started.append(driver)
    wait_for(lambda: (folder / "sweep.yaml").is_file() or driver.poll() is not None)
    assert driver.poll() is None, (tmp_path / "run.log").read_text()
    dirs = trial_dirs(folder)
    wait_for(lambda: max(len(e) for e in _epochs(dirs).values()) >= 2)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the terminal
    driver.wait(timeout=600)
    output = (tmp_path / "run.log").read_text()
    assert driver.returncode == 130, output
    assert f"memray resume {folder}" in output.strip().splitlines()[-1], output[-3000:]
    assert "Tuner.restore" not in output and "Could not fetch metrics" not in output
    states = {index: read_result(d).get("status") for index, d in dirs.items()}
    assert "interrupted" in states.values() and "failed" not in states.values(), states
    assert "interrupted" in sweep.sweep_status(folder)

    resumed = _start(["resume", str(folder)], tmp_path, tmp_path / "resume-killed.log")
    started.append(resumed)
    before = _epochs(dirs)
    wait_for(lambda: any(len(e) > len(before[i]) for i, e in _epochs(dirs).items()))
    os.killpg(resumed.pid, signal.SIGKILL)  # kill -9: the driver and its Ray
    resumed.wait(timeout=60)
    killed = {index: read_result(d).get("status") for index, d in dirs.items()}
    assert "running" in killed.values(), killed
    status = sweep.sweep_status(folder)  # no driver alive: a `running` trial is lost
    assert "lost" in status and " running " not in status

    final = _start(["resume", str(folder)], tmp_path, tmp_path / "resume.log")
    started.append(final)
    final.wait(timeout=1200)
    output = (tmp_path / "resume.log").read_text()
    assert final.returncode == 0, output
    union = _history_union(folder)
    for index, trial_dir in dirs.items():
        result = read_result(trial_dir)
        assert result["status"] == "success"
        epochs = [int(row["epoch"]) for row in result["epochs"]]
        assert epochs == list(range(5))
        ids, history = union[index]
        assert len(ids) == 1, ids  # one run per trial
        assert history == epochs, (index, history)  # every epoch exactly once, in order


def _on_a_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """`memray ARGS` with a pseudo-terminal (160 x 40) as its stdin, stdout and stderr, as
    in a terminal window: (exit code, everything it wrote there)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "memray.cli", *args, "--num-cpus", "2"], cwd=cwd,
                               stdin=child, stdout=child, stderr=child, start_new_session=True,
                               env={**os.environ, **env, "TERM": "xterm-256color"})
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:  # every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:  # exited, and Ray's processes wrote nothing more for a second
                break
        else:
            raise AssertionError("memray did not finish in time: " + b"".join(chunks).decode(errors="replace")[-3000:])
        return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(main)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.ray
def test_a_piped_sweep_prints_a_line_per_trial_and_epoch_and_no_more(tmp_path):
    epochs, trials = 1, 2
    path = write_small_sweep(tmp_path, "piped", epochs=epochs, methods=("full", "lora"))
    log = tmp_path / "run.log"
    driver = _start(["run", str(path)], tmp_path, log)
    try:
        assert driver.wait(timeout=600) == 0, log.read_text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()  # stdout and stderr together, Ray's start-up included
    assert len(lines) <= 2 + trials * ((epochs + 1) + 2), "\n".join(lines)
    assert not any("\x1b[" in line or "Trial status" in line or "(run_cell" in line for line in lines), lines
    for name in trial_dirs(tmp_path / "results" / "piped").values():
        mine = [line.removeprefix(f"[memray] {name.name}: ") for line in lines if line.startswith(f"[memray] {name.name}: ")]
        assert mine[0] == "running" and mine[-1] == "success", mine
        assert [line.split(" | ")[0] for line in mine[1:-1]] == [f"epoch {e}/{epochs}" for e in range(epochs + 1)]
        assert "val ppl" in mine[-2] and "loss AUC" in mine[-2]
    assert lines[-1].startswith("[memray] sweep piped: 2 trials: 2 success;") and "wandb sync" in lines[-1]


@pytest.mark.ray
def test_on_a_terminal_a_sweep_is_one_live_table_and_a_line_per_failure(tmp_path):
    path = write_small_sweep(tmp_path, "live", epochs=1, methods=("full", "lora"))
    fault = {EPOCH_HOOK_ENV: f"{Path(__file__).parent / 'faults.py'}:fail_at", FAULT_ENV: "1:1"}
    code, screen = _on_a_terminal(["run", str(path), "--max-failures", "0"], tmp_path, fault)
    text = ANSI.sub("", screen).replace("\r", "")
    assert code == 1, text[-3000:]
    assert "\x1b[1A" in screen and "\x1b[2K" in screen  # the table is redrawn in place: cursor up, erase line
    assert text.count("trial") > 2 and "[memray] sweep live:" in text  # more than one frame of it
    names = {index: d.name for index, d in trial_dirs(tmp_path / "results" / "live").items()}
    failures = re.findall(rf"\[memray\] {re.escape(names[1])}: failed: ([^\n]*)", text)  # the table's frames
    assert failures == ["RuntimeError: fault injected by MEMRAY_FAULT at epoch 1"], text  # run on, erased lines apart
    assert "[/]" not in text and "[cyan]" not in text  # styles drawn, not shown as markup
    assert "Traceback" not in text and "Trial task failed" not in text  # the reason's line, not Tune's report
    assert not re.search(r"\[memray\] \S+: (epoch|running)", text)  # no per-epoch lines: the table shows them
    last = text[text.rindex("elapsed"):]  # the table's last frame, below its header
    rows = {name: line.split() for line in last.splitlines() for name in names.values() if line.startswith(name)}
    assert rows[names[0]][1:3] == ["success", "1/1"] and rows[names[1]][1:3] == ["failed", "1/1"], last
    assert re.match(r"\d+\.\d\d$", rows[names[0]][3]) and re.match(r"0\.\d{3}$", rows[names[0]][4])  # val ppl, AUC


def test_logged_epochs_reads_a_run_file_cut_short(tmp_path):
    """A W&B file whose writer was killed mid-record still yields the epochs before the cut."""
    wandb = pytest.importorskip("wandb")
    run = wandb.init(project="p", id="cutshort01", dir=str(tmp_path), mode="offline",
                     settings=wandb.Settings(silent=True, console="off"))
    for epoch in range(4):
        run.log({"epoch": epoch, "val/ppl": 10.0 - epoch}, step=epoch)
    run.finish()
    wandb.teardown()
    (path,) = (tmp_path / "wandb").glob("offline-run-*-cutshort01/run-cutshort01.wandb")
    assert logged_epochs(tmp_path / "wandb", "cutshort01") == {0, 1, 2, 3}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cut = logged_epochs(tmp_path / "wandb", "cutshort01")
    assert cut <= {0, 1, 2, 3} and cut == set(range(len(cut)))


REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "sweeps" / "demo.yaml"


def test_switching_the_method_by_override_takes_its_grid_settings_and_says_so():
    from memray.files import load_trial

    notes: list[str] = []
    config = load_trial(DEMO, ["method.name=lora", "method.rank=4", "train.epochs=3"], notes=notes)
    assert config.method.name == "lora" and config.method.rank == 4 and config.method.lr == 0.003
    assert config.method.placement == "attn" and config.train.epochs == 3
    (note,) = notes
    assert "method.name=lora" in note and "rank 4" in note and "lr 0.003" in note and "grid's lora entry" in note


def test_switching_the_method_of_a_plain_trial_drops_what_the_new_method_lacks(tmp_path):
    from memray.files import load_trial

    path = tmp_path / "one.yaml"
    path.write_text("model: {name: tiny-gpt2}\nmethod: {name: prefix, virtual_tokens: 7, lr: 0.01}\n")
    notes: list[str] = []
    config = load_trial(path, ["method.name=prompt"], notes=notes)
    assert config.method.name == "prompt" and config.method.virtual_tokens == 7 and config.method.lr is None
    assert "prefix's settings that prompt accepts" in notes[0] and "lr 0.01" in notes[0]
    notes.clear()
    config = load_trial(path, ["method.name=lora"], notes=notes)
    assert config.method.name == "lora" and config.method.lr is None  # lora's own default lr
    assert "dropped" in notes[0] and "virtual_tokens 7" in notes[0] and "lr: lora's default" in notes[0]


def test_a_key_of_another_method_names_that_method():
    from memray.config import ConfigError
    from memray.files import load_trial

    with pytest.raises(ConfigError, match=r"method.rank: rank belongs to method lora.*method.name=lora"):
        load_trial(DEMO, ["method.rank=4"])


def test_status_of_a_sweep_file_names_the_folder_to_look_at():
    from memray.config import ConfigError

    with pytest.raises(ConfigError, match=r"a sweep file, not a sweep folder.*results/demo"):
        sweep.sweep_status(DEMO)


def test_a_failed_preflight_leaves_no_trial_folder(tmp_path, capsys):
    from memray.cli import main

    code = main(["trial", str(DEMO), "data.dataset=local", f"data.path={tmp_path / 'missing.jsonl'}",
                 "--output-dir", str(tmp_path / "runs")])
    assert code == 2 and "data.path" in capsys.readouterr().err
    assert not any((tmp_path / "runs").rglob("*"))
