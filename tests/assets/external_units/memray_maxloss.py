"""A per-sample attack from outside memray: the negated highest token loss of a sample
(a member has no very surprising token). Registered through a `memray.attacks` entry point."""

from __future__ import annotations

from memray.attacks import attack


@attack("maxloss")
def max_loss(config, target, text, reference) -> float:
    return float(target.logprobs.min())
