"""Fault injection for sweep tests, kept out of memray: a function that
`MEMRAY_EPOCH_HOOK` (memray.sweep.context.EPOCH_HOOK_ENV) makes every trial process call
after each epoch it reports. `MEMRAY_FAULT=<cell>:<epoch>` picks the trial and epoch: a
single-process trial then raises, as a bug would; in a multi-worker trial its last worker
process dies, as when its node goes away. The driver hands both variables to every trial
(memray forwards its MEMRAY_* settings)."""

from __future__ import annotations

import os

from memray.sweep import EPOCH_HOOK_ENV

FAULT_ENV = "MEMRAY_FAULT"


def inject_fault(monkeypatch, cell: int, epoch: int) -> None:
    """Make trial `cell` fail right after it reports `epoch` (in sweeps started from now on)."""
    monkeypatch.setenv(EPOCH_HOOK_ENV, f"{__file__}:fail_at")
    monkeypatch.setenv(FAULT_ENV, f"{cell}:{epoch}")


def clear_fault(monkeypatch) -> None:
    monkeypatch.delenv(EPOCH_HOOK_ENV)
    monkeypatch.delenv(FAULT_ENV)


def fail_at(cell: int, epoch: int, rank: int, world_size: int) -> None:
    """The epoch hook: fail if (cell, epoch) is the one MEMRAY_FAULT names."""
    if os.environ.get(FAULT_ENV) != f"{cell}:{epoch}":
        return
    if world_size == 1:
        raise RuntimeError(f"fault injected by {FAULT_ENV} at epoch {epoch}")
    if rank == world_size - 1:
        os._exit(1)  # a worker process lost, as when its node goes away
