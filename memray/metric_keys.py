"""The names of the per-attack metrics: `mia/<attack label>/<statistic>` (`mia/loss/auc`,
`mia/mink@0.1/tpr@1%fpr_lo`), built and read here only, so that every module (the trial,
result files, W&B, the console, the report) spells them one way."""

from __future__ import annotations

from collections.abc import Iterable

#: The first part of every membership-inference metric's key.
MIA = "mia"
#: The statistic every attack reports: AUC-ROC.
AUC = "auc"


def mia_key(label: str, statistic: str = AUC) -> str:
    """The key of an attack's statistic: `mia/<label>/<statistic>`."""
    return f"{MIA}/{label}/{statistic}"


def mia_prefix(label: str) -> str:
    """What every key of the attack starts with: `mia/<label>/`."""
    return f"{MIA}/{label}/"


def is_mia_key(key: str) -> bool:
    """Whether `key` is a membership-inference metric (of any attack and statistic)."""
    return key.startswith(f"{MIA}/")


def parse_mia_key(key: str) -> tuple[str, str] | None:
    """(label, statistic) of a `mia/<label>/<statistic>` key; None for any other key."""
    if not is_mia_key(key):
        return None
    label, _, statistic = key[len(MIA) + 1:].rpartition("/")
    return (label, statistic) if label and statistic else None


def is_auc_key(key: str) -> bool:
    """Whether `key` is an attack's AUC: `mia/<label>/auc`."""
    parsed = parse_mia_key(key)
    return parsed is not None and parsed[1] == AUC


def auc_labels(keys: Iterable[str]) -> list[str]:
    """The attack labels that have an AUC among `keys`, in their order."""
    return [parsed[0] for key in keys if (parsed := parse_mia_key(key)) and parsed[1] == AUC]
