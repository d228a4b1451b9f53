"""A dataset from outside memray: short generated fables, one per index. Registered through
a `memray.datasets` entry point."""

from __future__ import annotations

from memray.data import Pool, register

ANIMALS = ["fox", "crow", "hare", "tortoise", "lion", "mouse", "ant", "grasshopper", "wolf", "lamb", "owl", "goat"]
LESSONS = ["slow and steady wins", "pride comes before a fall", "kindness is never wasted",
           "look before you leap", "a friend in need is a friend indeed", "honesty is the best policy"]


def fable(index: int) -> str:
    first, second = ANIMALS[index % len(ANIMALS)], ANIMALS[(index * 7 + 3) % len(ANIMALS)]
    lesson = LESSONS[(index * 5) % len(LESSONS)]
    return (f"Fable {index}: the {first} met the {second} on day {index * 13 % 97} by the river number "
            f"{index}. They argued, then parted, and the {second} learned that {lesson}.")


@register("fables", members=40)
def fables(data, tokenizer, source) -> Pool:
    return Pool("fables", 400, lambda i: (f"fables/{i:04d}", fable(i)))
