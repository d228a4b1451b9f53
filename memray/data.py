"""Datasets: the registry of text sources and the deterministic member / non-member split.

Owns where texts come from (Hugging Face hub datasets, local files, offline built-ins), how
they are cut into samples, and which samples a trial trains on (members), scores as held-out
(non-members) and uses for validation loss. The split is a pure function of (dataset, seed,
sizes, max_length); its hash is stored with the trial.
"""

from __future__ import annotations

import hashlib
from typing import Literal


def _topic_part(key: str) -> Literal["pretrain", "finetune"]:
    return "pretrain" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 == 0 else "finetune"


def pydoc_texts(part: Literal["pretrain", "finetune"]) -> list[str]:
    """CPython's `pydoc_data.topics` documents of one part, whitespace-normalized, by topic key.

    A topic belongs to "pretrain" iff sha256(key) is even, else to "finetune". The built-in
    tiny models are pretrained on "pretrain"; the `pydoc` dataset samples only "finetune",
    so its members and non-members were never seen in pretraining.
    """
    if part not in ("pretrain", "finetune"):
        raise ValueError(f"part must be 'pretrain' or 'finetune', not {part!r}")
    from pydoc_data.topics import topics

    return [" ".join(topics[key].split()) for key in sorted(topics) if _topic_part(key) == part]
