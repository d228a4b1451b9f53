"""Helpers shared by the sweep, cluster and distributed tests: small sweep files, trial
folders of a sweep folder, and offline W&B runs read back with W&B's own protobuf classes.

Importable as `helpers` however pytest is started (`pythonpath = ["tests"]` in pyproject).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from memray.files import load_sweep
from memray.references import sweep_cells
from memray.sweep import trial_names

#: A tiny grid of three methods on the tiny model: a few seconds per trial on one core.
SMALL_SWEEP = """\
name: {name}
base:
  model: {{name: tiny-gpt2}}
  data: {{dataset: pydoc, max_length: 64, members: 24, nonmembers: 24, validation: 12}}
  train: {{epochs: {epochs}, batch_size: 8}}
  eval: {{batch_size: 24}}
  attacks: [loss, zlib]
grid:
  method: {methods}
wandb: {{project: memray-test, mode: {wandb_mode}}}
"""
SMALL_METHODS = {
    "full": "{name: full, lr: 0.001}", "head": "{name: head, lr: 0.003}", "lora": "{name: lora, rank: 4, lr: 0.003}",
}


def write_small_sweep(directory: Path, name: str, epochs: int = 3, wandb_mode: str = "offline",
                      methods: tuple[str, ...] = ("full", "head", "lora")) -> Path:
    path = Path(directory) / f"{name}.yaml"
    grid = "[" + ", ".join(SMALL_METHODS[m] for m in methods) + "]"
    path.write_text(SMALL_SWEEP.format(name=name, epochs=epochs, wandb_mode=wandb_mode, methods=grid))
    return path


def wait_for(condition, timeout: float = 900, what: str = "the condition", interval: float = 0.5) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def trial_dirs(sweep_dir: Path) -> dict[int, Path]:
    """Cell index -> trial folder, from the sweep folder's own sweep.yaml (the reference
    models of lira / rmia after the grid's cells)."""
    _, cells = load_sweep(Path(sweep_dir) / "sweep.yaml")
    return {index: Path(sweep_dir) / "trials" / name for index, name in trial_names(sweep_cells(cells)).items()}


def read_result(trial_dir: Path) -> dict[str, Any]:
    path = Path(trial_dir) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def file_states(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below `directory` with its mtime (ns) and bytes: equal means untouched."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def wandb_records(path: Path):
    """Records of a `.wandb` file: W&B's LevelDB-style log (32 KiB blocks of chunks with a
    7-byte header: crc32, length, type) after a 7-byte W&B header, each record one
    `wandb_internal_pb2.Record`. Parsed with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:  # zero padding up to the next block
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        else:  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """One offline run folder: its id, group, project, name, config and history rows."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run: dict[str, Any] = {"config": {}, "history": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, group=record.run.run_group, project=record.run.project,
                       name=record.run.display_name)
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
    return run


def wandb_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    """Every offline run below a `wandb/` folder, oldest first, with its folder."""
    runs = []
    for run_dir in sorted(Path(wandb_dir).glob("offline-run-*")):
        runs.append({**read_wandb_run(run_dir), "dir": run_dir})
    return runs


