"""The offline text corpus shipped with CPython (`pydoc_data.topics`), split in two parts by
topic: "pretrain", on which the built-in tiny models are pretrained (`memray.models`), and
"finetune", from which the `pydoc` dataset samples (`memray.data`). Kept apart from both
so that models need no dataset code.
"""

from __future__ import annotations

import hashlib
from typing import Literal


def pydoc_topics(part: Literal["pretrain", "finetune"]) -> list[tuple[str, str]]:
    """(topic key, whitespace-normalized text) of one part of the corpus, by topic key."""
    if part not in ("pretrain", "finetune"):
        raise ValueError(f"part must be 'pretrain' or 'finetune', not {part!r}")
    from pydoc_data.topics import topics

    def topic_part(key: str) -> str:
        return "pretrain" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 == 0 else "finetune"

    return [(key, " ".join(topics[key].split())) for key in sorted(topics) if topic_part(key) == part]


def pydoc_texts(part: Literal["pretrain", "finetune"]) -> list[str]:
    """CPython's `pydoc_data.topics` documents of one part, whitespace-normalized, by topic key.

    A topic belongs to "pretrain" iff sha256(key) is even, else to "finetune". The built-in
    tiny models are pretrained on "pretrain"; the `pydoc` dataset samples only "finetune"
    (leaving out passages it repeats from "pretrain"), so its members and non-members were
    never seen in pretraining.
    """
    return [text for _, text in pydoc_topics(part)]
