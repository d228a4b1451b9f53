"""Datasets: the registry of text sources and the deterministic member / non-member split.

Owns where texts come from (Hugging Face hub datasets, local files, offline built-ins), how
they are cut into samples, and which samples a trial trains on (members), scores as held-out
(non-members) and uses for validation loss. `load_split` is the entry point; the split is a
pure function of (dataset, seed, sizes, max_length, tokenizer) and its hash is stored with
the trial.

How a split is drawn. Each dataset gives one pool of candidate samples. A seeded numpy
generator permutes the pool; walking that order, blank texts and repeats of a text already
taken are skipped, and the first `members` samples become members, the next `nonmembers`
non-members and the next `validation` validation samples. So the three sets are disjoint in
ids and in texts, and members do not change when only the other sizes do.

Every dataset is one registered unit (`register`): its name, default size, how its pool of
candidate samples is made and, for hub datasets, where its files lie (`HubSource`); the
names `data.dataset` accepts are the registry's.

For hub datasets the pool is the train split only: members, non-members and validation
are disjoint draws from it, so members and non-members are identically distributed. The
hub's own validation / test splits are not used, because a shift between splits (WebNLG's
test set has categories unseen in training) would raise membership AUC without any
memorization. Their files come from the repository pinned to a commit (`data.revision`
overrides it) through `huggingface_hub`, or from `data.path`, a folder in the repository's
own layout; the commit is kept with the split (`Split.origin`).

Samples:
- wikitext2: Salesforce/wikitext, wikitext-2-raw-v1: the train split's raw text as one
  token stream of the trial's tokenizer, cut into blocks of `max_length` tokens across
  articles, BOS included (`block_tokens`: with a BOS token a block holds max_length - 1
  text tokens, so none is truncated away when scored or trained on; the last block is
  dropped when under a quarter of that); no tokenizer family gets a space added at line
  starts.
- webnlg: WebNLG 3.0 English (the Parquet export of webnlg-challenge/web_nlg): one sample
  per entry, "Triples: s | p | o; ...\\nText: <first reference>"; an entry longer than
  max_length is left out, not cut.
- xsum: the Parquet export of EdinburghNLP/xsum: one sample per article,
  "Document: ...\\nSummary: ..."; the document is cut to fit max_length, never the summary.
- local: a .jsonl (field `text_field`), .txt (one sample per non-empty line; use .jsonl for
  multi-line samples) or .csv (column `text_field`) file.
- pydoc: the "finetune" half of CPython's `pydoc_data.topics`, each topic cut into blocks
  of `max_length` tokens as wikitext2 (BOS included); the built-in tiny models are pretrained on the other half, and
  blocks sharing a 13-word run with it are left out.
- synthetic: 5,000 fictional people, each with unique facts (name, birth, job, e-mail,
  phone), generated without randomness so that every machine sees the same records.

Run `memray download NAME DIR` on a machine with network to download a hub
dataset for offline use (`data.path: DIR`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from memray.corpus import pydoc_texts, pydoc_topics
from memray.registry import Registry, load_entry_points
from memray.schema import ConfigError, Schema


# ---------------------------------------------------------------------------------------
# The `data:` section (the datasets' unit owns it; memray.config assembles the trial schema)
# ---------------------------------------------------------------------------------------


class DuplicatesConfig(Schema):
    fraction: float = Field(0.1, gt=0, le=1)  # share of training samples that get duplicated
    copies: list[int] = [2, 5, 10]  # each duplicated sample appears this many times in total

    @field_validator("copies")
    @classmethod
    def _copies(cls, copies: list[int]) -> list[int]:
        if not copies or any(c < 2 for c in copies):
            raise ValueError("must be a non-empty list of copy counts, each at least 2")
        return copies


class CanaryConfig(Schema):
    """Secret canaries inserted into the training data; their exposure is measured each epoch
    (Carlini et al. 2019, "The Secret Sharer", arXiv 1802.08232)."""

    count: int = Field(10, gt=0)  # canaries inserted into the training data
    repeats: list[int] = [10]  # copies of each inserted canary; a list spreads canaries over levels
    heldout: int | None = Field(None, ge=0)  # never-inserted controls (repeats 0); None: as many as count
    format: str = "my secret number is {secret}"  # must hold {secret} once
    digits: int = Field(6, gt=0)  # random digits in each secret
    separator: str = " "  # between digits: " " makes each digit its own token in most tokenizers
    candidates: int = Field(1000, ge=2)  # population for the exposure rank; max exposure log2(this)

    @field_validator("repeats", mode="before")
    @classmethod
    def _one_level(cls, repeats: Any) -> Any:
        return [repeats] if isinstance(repeats, int) else repeats

    @field_validator("repeats")
    @classmethod
    def _repeats(cls, repeats: list[int]) -> list[int]:
        if not repeats or any(r < 1 for r in repeats):
            raise ValueError("must be a copy count or a non-empty list of them, each at least 1 (held-out canaries: use heldout)")
        return repeats

    @field_validator("format")
    @classmethod
    def _format(cls, format: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(format) if name is not None]
        except ValueError as err:
            raise ValueError(f"{format!r} is not a valid format string: {err}") from None
        if fields != ["secret"]:
            raise ValueError(f"{format!r} must contain the field {{secret}} exactly once and no other field")
        return format

    @model_validator(mode="after")
    def _enough_secrets(self) -> "CanaryConfig":
        if self.heldout is None:
            self.heldout = self.count
        needed = self.count + self.heldout + self.candidates
        if 10**self.digits < needed:
            raise ValueError(
                f"digits={self.digits} gives {10**self.digits} secrets, fewer than the "
                f"{needed} distinct ones needed (count + heldout + candidates)"
            )
        return self


class OverlapFilterConfig(Schema):
    """Non-members whose word n-gram overlap with the members exceeds `threshold` are
    dropped and redrawn from unused samples (MIMIR's splits, Duan et al. 2024: 7- or
    13-grams at 0.2 or 0.8), so that an AUC does not rest on near-copies across the split."""

    ngram: Literal[7, 13] = 13  # words per n-gram (MIMIR's sizes)
    threshold: float = Field(0.8, gt=0, lt=1)  # largest share of a non-member's n-grams found in members


class DataConfig(Schema):
    dataset: str = Field(default_factory=lambda: default_dataset())  # the registry's default (`register(default=True)`)
    path: str | None = None  # local file (jsonl / txt / csv) or a local copy of a hub dataset
    revision: str | None = None  # hub datasets: commit or branch; None: the one memray pins
    text_field: str = "text"  # column holding the text, for local jsonl / csv
    max_length: int = Field(128, ge=8)  # tokens per sample; wikitext2 is chunked into such blocks
    members: int | None = Field(None, gt=0)  # training samples (all are members); None: dataset default
    nonmembers: int | None = Field(None, gt=0)  # held-out samples scored; None: as many as members
    validation: int = Field(200, gt=0)  # held-out samples for val loss / perplexity
    split_seed: int | None = None  # None: the trial's seed
    duplicates: DuplicatesConfig | None = None
    canaries: CanaryConfig | None = None  # secret canaries added to the training texts
    overlap_filter: OverlapFilterConfig | None = None  # None: non-members as drawn (the split audit still measures them)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, dataset: str) -> str:
        if dataset not in dataset_names():
            raise ValueError(f"{dataset!r} is not one of {', '.join(dataset_names())}")
        return dataset

    @model_validator(mode="after")
    def _dataset_fields(self) -> "DataConfig":
        check_fields(self)  # the dataset-specific keys its registry entry reads and requires
        return self


def default_dataset() -> str:
    """The dataset of a config without `data.dataset` (its registry entry says `default=True`)."""
    return REGISTRY.default


def dataset_names() -> tuple[str, ...]:
    """The names `data.dataset` accepts: those of the registry, the hub datasets first."""
    return tuple(sorted(REGISTRY, key=lambda name: REGISTRY[name].hub is None))


log = logging.getLogger(__name__)

LOCAL_MAX_DEFAULT_MEMBERS = 1000  # local files: see `_default_members`
SYNTHETIC_RECORDS = 5000  # pool size of the `synthetic` dataset


# ---------------------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One text of a split."""

    id: str  # stable within the dataset, e.g. "wikitext2/train/00042"
    text: str
    copies: int  # times it appears in the training data; 0 for non-members and validation


@dataclass(frozen=True)
class Split:
    """The samples one trial trains on, scores as held-out, and validates on."""

    members: list[Sample]  # every training sample once; duplication is in .copies
    nonmembers: list[Sample]  # held-out samples scored as non-members; never trained on
    validation: list[Sample]  # held-out samples for val loss / perplexity
    split_hash: str  # sha256 of ids, texts and copies of all three lists
    origin: dict[str, str | None] | None = None  # hub datasets: repo, commit and local path (data.path)
    overlap_filter: dict[str, Any] | None = None  # data.overlap_filter's record (`filter_nonmembers`), when set

    def training_texts(self) -> list[str]:
        """Member texts with duplicates expanded (copies=5 appears 5 times), shuffled.

        The shuffle is seeded by the split hash, so the order is fixed for a given split.
        """
        texts = [s.text for s in self.members for _ in range(s.copies)]
        order = np.random.default_rng(int(self.split_hash[:16], 16)).permutation(len(texts))
        return [texts[i] for i in order]


def load_split(data: DataConfig, seed: int, tokenizer: Any, source: str = "config") -> Split:
    """Draw the members, non-members and validation samples of one trial.

    Takes the trial's data config, the trial seed (`data.split_seed` overrides it), a
    Hugging Face tokenizer (used to cut wikitext2 and pydoc into `max_length`-token blocks)
    and the name of the config source for error messages. Returns a `Split`; the same
    inputs always give the same split. With `data.overlap_filter`, non-members whose word
    n-gram overlap with the members exceeds its threshold are dropped and replaced by the
    next samples of the walk after validation that pass it (`filter_nonmembers`). Raises
    ConfigError when the data cannot be loaded or holds too few samples for the requested
    sizes.
    """
    return _load(data, seed, tokenizer, source, 0)[0]


def spare_samples(data: DataConfig, seed: int, tokenizer: Any, count: int, source: str = "config") -> list[Sample]:
    """Up to `count` samples of the dataset outside the split `load_split` draws from the
    same arguments: the next ones of its seeded walk after the validation samples and after
    the candidates the overlap filter read (none when the pool ran out before them), each
    with copies 1."""
    return _load(data, seed, tokenizer, source, count, quiet=True)[1]


def _load(data: DataConfig, seed: int, tokenizer: Any, source: str, spare: int,
          quiet: bool = False) -> tuple[Split, list[Sample]]:
    """(the split, `spare` samples of the walk after it)."""
    pool, members, nonmembers, rng, walk = _walk(data, seed, tokenizer, source)
    drawn = list(itertools.islice(walk, members + nonmembers + data.validation))
    if len(drawn) < members + nonmembers + 1:
        raise _too_few(data, pool.label, len(drawn), members, nonmembers, source)
    validation = len(drawn) - members - nonmembers
    if validation < data.validation and not quiet:
        log.warning("%s: data.validation: only %d samples left for validation after %d members "
                    "and %d non-members (asked for %d)", source, validation, members, nonmembers,
                    data.validation)

    copies = _copies(members, data, rng)
    member_samples = [Sample(i, t, c) for (i, t), c in zip(drawn[:members], copies)]
    held_out = [Sample(i, t, 0) for i, t in drawn[members:]]
    nonmember_samples, filtered = held_out[:nonmembers], None
    if data.overlap_filter is not None:
        nonmember_samples, filtered = filter_nonmembers(member_samples, nonmember_samples,
                                                        (Sample(i, t, 0) for i, t in walk), data.overlap_filter.ngram,
                                                        data.overlap_filter.threshold, source)
    split = _split(member_samples, nonmember_samples, held_out[nonmembers:], pool.origin, filtered)
    return split, [Sample(i, t, 1) for i, t in itertools.islice(walk, spare)]


def _walk(data: DataConfig, seed: int, tokenizer: Any,
          source: str) -> tuple[Pool, int, int, np.random.Generator, Iterator[tuple[str, str]]]:
    """The seeded walk of `load_split`: (pool, members, non-members, the generator as the
    walk leaves it, the walk's samples in order: members, non-members, validation, then the rest)."""
    split_seed = data.split_seed if data.split_seed is not None else seed
    pool = REGISTRY[data.dataset].pool(data, tokenizer, source)
    members = data.members or _default_members(data, pool)
    nonmembers = data.nonmembers or members
    if pool.size < members + nonmembers + 1:
        raise _too_few(data, pool.label, pool.size, members, nonmembers, source)
    rng = np.random.default_rng(split_seed % 2**64)  # numpy takes no negative seeds
    return pool, members, nonmembers, rng, _draw(pool, rng.permutation(pool.size))


# ---------------------------------------------------------------------------------------
# The split audit: word n-gram overlap of non-members with members
# ---------------------------------------------------------------------------------------

#: Word n-gram sizes of the split audit: MIMIR's (Duan et al. 2024, arXiv 2402.07841).
AUDIT_NGRAMS = (7, 13)
#: Overlap levels the audit counts non-members above: MIMIR's split thresholds.
AUDIT_THRESHOLDS = (0.2, 0.8)
#: How the audit measures overlap, recorded beside its numbers.
AUDIT_MEASURE = ("per non-member, the share of its word n-grams (whitespace-split words) that occur in some member "
                 "(MIMIR's n-gram inclusion, Duan et al. 2024); a text of fewer than n words has none: overlap 0")


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The text's word n-grams in order (words split on whitespace)."""
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def ngram_overlap(texts: Sequence[str], reference_texts: Sequence[str], n: int) -> np.ndarray:
    """Per text, the share of its word n-grams that occur in any of `reference_texts`
    (0 for a text of fewer than n words)."""
    seen = {gram for text in reference_texts for gram in word_ngrams(text, n)}
    shares = []
    for text in texts:
        grams = word_ngrams(text, n)
        shares.append(sum(gram in seen for gram in grams) / len(grams) if grams else 0.0)
    return np.array(shares, dtype=np.float64)


def filter_nonmembers(members: list[Sample], nonmembers: list[Sample], candidates: Iterator[Sample], n: int,
                      threshold: float, source: str = "config") -> tuple[list[Sample], dict[str, Any]]:
    """Non-members whose word n-gram overlap with the members is at most `threshold`: the
    drawn ones that pass, in order, then candidates (the walk's samples after validation)
    that pass, until there are as many as were drawn. Returns them and the record of the
    filter (result.json `split_audit.filter`). Raises ConfigError naming
    data.overlap_filter when the dataset holds too few that pass."""
    seen = {gram for sample in members for gram in word_ngrams(sample.text, n)}

    def passes(sample: Sample) -> bool:
        grams = word_ngrams(sample.text, n)
        return not grams or sum(gram in seen for gram in grams) / len(grams) <= threshold

    kept = [sample for sample in nonmembers if passes(sample)]
    read = 0
    while len(kept) < len(nonmembers):  # checked before each read: no candidate is taken past the count
        candidate = next(candidates, None)
        if candidate is None:
            break
        read += 1
        if passes(candidate):
            kept.append(candidate)
    if len(kept) < len(nonmembers):
        raise ConfigError(source, "data.overlap_filter",
                          f"only {len(kept)} non-members have a {n}-gram overlap with the members of at most "
                          f"{threshold:g} ({len(nonmembers)} are scored): raise threshold, lower data.nonmembers, or "
                          "use a larger dataset")
    dropped = len(nonmembers) - sum(passes(sample) for sample in nonmembers)
    return kept, {"ngram": n, "threshold": threshold, "dropped": dropped, "redrawn": dropped,
                  "candidates_read": read, "kept": len(kept),
                  "rule": "non-members above the threshold dropped and replaced by the next samples of the seeded "
                          "walk after validation that pass it; the count is kept (a dataset that cannot keep it "
                          "is refused); validation is unchanged"}


def split_audit(members: Sequence[Sample], nonmembers: Sequence[Sample],
                filtered: dict[str, Any] | None = None) -> dict[str, Any]:
    """result.json's `split_audit`: the non-members' word n-gram overlap with the members
    for each of AUDIT_NGRAMS (mean, median, max, share above each of AUDIT_THRESHOLDS), the
    measure, and the overlap filter's record when one ran."""
    member_texts = [sample.text for sample in members]
    audit: dict[str, Any] = {"measure": AUDIT_MEASURE, "members": len(members), "nonmembers": len(nonmembers)}
    for n in AUDIT_NGRAMS:
        shares = ngram_overlap([sample.text for sample in nonmembers], member_texts, n)
        if not len(shares):
            continue
        audit[f"{n}gram"] = {"mean": float(shares.mean()), "median": float(np.median(shares)),
                             "max": float(shares.max()),
                             **{f"above_{t:g}": float((shares > t).mean()) for t in AUDIT_THRESHOLDS}}
    audit["filter"] = filtered
    return audit


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


#: Keys of the `data:` section only some datasets read (the rest apply to every dataset);
#: a dataset's registry entry names those it reads (`DatasetSpec.fields`), and a config
#: that sets one its dataset does not read is refused (`check_fields`).
DATASET_FIELDS = ("path", "revision", "text_field")
#: What a hub dataset reads: a local copy in the repository's layout, and the commit.
HUB_FIELDS = ("path", "revision")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset memray knows by name (`data.dataset`)."""

    name: str
    members: int | None  # data.members when not set; None: from the pool's size (local files)
    pool: Callable[[DataConfig, Any, str], "Pool"]  # (data config, tokenizer, source) -> candidates
    hub: HubSource | None = None  # where a hub dataset lies (download, data.path layout)
    blocks: bool = False  # cut into max_length-token blocks: a shorter max_length makes more samples
    fields: tuple[str, ...] = ()  # of DATASET_FIELDS, those it reads
    required: tuple[str, ...] = ()  # of `fields`, those a config must set (a local file's path)
    planned_members: int = 1000  # members when data.members is unset and `members` is None, for planning


#: Every dataset by name; `config.dataset_names()` (the names `data.dataset` accepts) is derived from it.
REGISTRY: Registry[DatasetSpec] = Registry("dataset")


def register(name: str, *, members: int | None, hub: HubSource | None = None, blocks: bool = False,
             fields: tuple[str, ...] | None = None, required: tuple[str, ...] = (),
             default: bool = False) -> Callable[[Callable[..., "Pool"]], Callable[..., "Pool"]]:
    """Decorator: register a pool function (data config, tokenizer, source) -> candidate
    samples as dataset `name`, with the `data:` keys of DATASET_FIELDS it reads (default: a
    hub dataset's HUB_FIELDS, none for others); `default`: the dataset of a config that names
    none. A name registered twice, or a second default, is an error."""
    read = tuple(fields) if fields is not None else (HUB_FIELDS if hub else ())
    unknown = sorted((set(read) | set(required)) - set(DATASET_FIELDS))
    if unknown or set(required) - set(read):
        raise ValueError(f"dataset {name!r}: fields must be of {', '.join(DATASET_FIELDS)} and required ones read")

    def add(pool: Callable[..., Pool]) -> Callable[..., Pool]:
        REGISTRY.add(name, DatasetSpec(name, members, pool, hub, blocks, read, tuple(required)), default=default)
        return pool
    return add


def check_fields(data: DataConfig) -> None:
    """ValueError naming the key if `data` sets a dataset-specific key its dataset does not
    read, or leaves out one it requires (`DatasetSpec.fields` / `required`)."""
    spec = REGISTRY[data.dataset]
    for key in DATASET_FIELDS:
        default = type(data).model_fields[key].default
        if key not in spec.fields and getattr(data, key) != default:
            readers = [name for name in REGISTRY if key in REGISTRY[name].fields]
            raise ValueError(f"dataset {data.dataset!r} does not read {key} (datasets that do: {', '.join(readers)})")
        if key in spec.required and getattr(data, key) == default:
            raise ValueError(f"dataset {data.dataset!r} needs data.{key}")


def planned_members(data: DataConfig) -> int:
    """Members a trial trains on, for planning before any data loads: data.members, else the
    dataset's default (a local file's depends on its size: `DatasetSpec.planned_members`)."""
    spec = REGISTRY[data.dataset]
    return data.members or spec.members or spec.planned_members


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Candidate samples of a dataset, read on demand (hub datasets can be large): what a
    dataset's pool function returns. memray shuffles the indices by seed and reads samples
    in that order until it has the members, non-members and validation samples it needs."""

    label: str  # for messages, e.g. "wikitext2 (train split, 128-token blocks)"
    size: int
    sample: Callable[[int], tuple[str, str]]  # index -> (id, text); text "" when unusable
    origin: dict[str, str | None] | None = None  # hub datasets: repo, commit, local path


def _draw(pool: Pool, order: np.ndarray) -> Iterator[tuple[str, str]]:
    """Walk `order` lazily, yielding the non-blank texts not seen before."""
    seen: set[str] = set()
    for index in order:
        sample_id, text = pool.sample(int(index))
        if not text.strip() or text in seen:
            continue
        seen.add(text)
        yield sample_id, text


def _copies(members: int, data: DataConfig, rng: np.random.Generator) -> list[int]:
    """Copies per member: round(fraction * members) members, chosen by `rng`, get the copy
    counts in turn (equal shares per count); the others appear once."""
    copies = [1] * members
    if data.duplicates is None:
        return copies
    chosen = rng.choice(members, size=round(data.duplicates.fraction * members), replace=False)
    for turn, index in enumerate(chosen):
        copies[index] = data.duplicates.copies[turn % len(data.duplicates.copies)]
    return copies


def _split(members: list[Sample], nonmembers: list[Sample], validation: list[Sample],
           origin: dict[str, str | None] | None, overlap_filter: dict[str, Any] | None = None) -> Split:
    payload = [[role, [[s.id, s.text, s.copies] for s in samples]]
               for role, samples in (("members", members), ("nonmembers", nonmembers),
                                     ("validation", validation))]
    digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()
    return Split(members, nonmembers, validation, digest, origin, overlap_filter)


@dataclass(frozen=True)
class ReferenceData:
    """What a reference model of lira / rmia trains on: its split (members: its half of the
    audit pool, then the top-up) and how that was made up, for result.json."""

    split: Split
    pool_in: int  # audit-pool samples it trains on: the first pool_in of split.members
    composition: dict[str, int]


def reference_split(split: Split, pool: list[Sample], in_half: Sequence[bool], texts: int, seed: int,
                    more: Callable[[int], list[Sample]], source: str = "config") -> ReferenceData:
    """The data of a reference model of lira / rmia, trained like its target.

    split: the target's split; pool: its audit pool (scored members, then scored
    non-members); in_half: which pool samples this reference trains on
    (`memray.reference_attacks.half_masks`); texts: the target's training texts
    (duplicates and canary copies counted); seed: the reference's own seed, which orders
    the top-up; more(count): up to count samples of the dataset outside the split
    (`spare_samples`), asked for only when the target's own samples do not suffice.

    Its members are its half of the pool (a target member with the target's copies, a
    target non-member once), then samples outside the pool up to `texts` training texts:
    the target's unscored members first (with their copies), then its unscored
    non-members, then `more`, each in an order seeded by `seed`; the last one's copies are
    cut to land on `texts` exactly. Its non-members are the rest of the pool; validation
    and origin are the target's. Raises ConfigError naming the sizes when the half alone
    exceeds `texts` or the dataset cannot supply the top-up.
    """
    if len(pool) != len(in_half):
        raise ValueError(f"{len(in_half)} in/out flags for an audit pool of {len(pool)} samples")
    inside = [dataclasses.replace(s, copies=max(s.copies, 1)) for s, keep in zip(pool, in_half) if keep]
    outside = [dataclasses.replace(s, copies=0) for s, keep in zip(pool, in_half) if not keep]
    half_texts = sum(s.copies for s in inside)
    if half_texts > texts:
        raise ConfigError(source, "data.nonmembers",
                          f"a reference model of lira / rmia trains on half of the audit pool, {len(inside)} samples "
                          f"({half_texts} texts with the target's duplicates), more than the target's {texts} "
                          f"training texts: score fewer non-members (data.nonmembers or eval.max_scored)")
    rng = np.random.default_rng(seed % 2**64)
    pooled = {s.id for s in pool}
    unscored = [[s for s in split.members if s.id not in pooled],
                [dataclasses.replace(s, copies=1) for s in split.nonmembers if s.id not in pooled]]
    candidates = [s for group in unscored for s in (group[i] for i in rng.permutation(len(group)))]
    missing = texts - half_texts
    if sum(s.copies for s in candidates) < missing:
        extra = more(missing)
        candidates += [extra[i] for i in rng.permutation(len(extra))]
    top_up: list[Sample] = []
    for sample in candidates:
        if missing <= 0:
            break
        top_up.append(dataclasses.replace(sample, copies=min(sample.copies, missing)))
        missing -= top_up[-1].copies
    if missing > 0:
        raise ConfigError(source, "data.members",
                          f"a reference model of lira / rmia trains on as many texts as the target ({texts}): its "
                          f"half of the audit pool gives {half_texts}, and the dataset supplies only "
                          f"{texts - half_texts - missing} more outside the audit pool and validation (the target's "
                          f"unscored samples and the rest of the dataset); {texts - half_texts} are needed: use fewer "
                          "members or a larger dataset")
    composition = {"pool_samples": len(inside), "pool_texts": half_texts, "top_up_samples": len(top_up),
                   "top_up_texts": sum(s.copies for s in top_up), "texts": texts}
    return ReferenceData(_split(inside + top_up, outside, split.validation, split.origin, split.overlap_filter),
                         len(inside), composition)


def _default_members(data: DataConfig, pool: Pool) -> int:
    default = REGISTRY[data.dataset].members
    if default is not None:
        return default
    # Half of what validation leaves (validation takes at most a fifth of a small file).
    reserved = min(data.validation, pool.size // 5)
    return max(1, min(LOCAL_MAX_DEFAULT_MEMBERS, (pool.size - reserved) // 2))


def _too_few(data: DataConfig, label: str, available: int, members: int, nonmembers: int,
             source: str) -> ConfigError:
    return ConfigError(
        source, "data.members",
        f"{label} has {available} usable samples, but {members} members + {nonmembers} "
        f"non-members + at least 1 validation sample = {members + nonmembers + 1} were asked "
        f"for; lower data.members / data.nonmembers"
        + (" or data.max_length (shorter blocks make more samples)"
           if REGISTRY[data.dataset].blocks else ""))


# ---------------------------------------------------------------------------------------
# Chunking into token blocks
# ---------------------------------------------------------------------------------------


def block_tokens(tokenizer: Any, max_length: int) -> int:
    """Text tokens per block: `max_length` less the BOS slot when the tokenizer has a BOS
    token (`memray.scoring.tokenize_texts` puts one first and truncates to max_length), so
    that every token of a block is trained on and scored."""
    return max_length - 1 if getattr(tokenizer, "bos_token_id", None) is not None else max_length


def _token_blocks(token_ids: Sequence[int], max_length: int) -> list[Sequence[int]]:
    """Consecutive blocks of `max_length` tokens; a last block under max_length / 4 is dropped."""
    blocks = [token_ids[start:start + max_length] for start in range(0, len(token_ids), max_length)]
    if blocks and len(blocks[-1]) < max_length / 4:
        blocks.pop()
    return blocks


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are cut into blocks here, so no "too long" warning.
    return tokenizer(texts, add_special_tokens=False, verbose=False,
                     return_attention_mask=False)["input_ids"]


def _decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    # No clean-up of spaces: the text must tokenize back to (nearly) the same block. A
    # character whose bytes a block boundary splits decodes to U+FFFD; it is dropped.
    text = tokenizer.decode(list(token_ids), clean_up_tokenization_spaces=False)
    return text.strip("\ufffd")


# ---------------------------------------------------------------------------------------
# Built-in datasets: pydoc and synthetic
# ---------------------------------------------------------------------------------------


PRETRAIN_OVERLAP_WORDS = 13  # a shared run of 13 words counts as seen (GPT-3's contamination test)


@functools.cache
def _pretrain_word_runs() -> frozenset[tuple[str, ...]]:
    return frozenset(word_ngrams(" ".join(pydoc_texts("pretrain")), PRETRAIN_OVERLAP_WORDS))


def _seen_in_pretraining(text: str) -> bool:
    runs = _pretrain_word_runs()
    return any(gram in runs for gram in word_ngrams(text, PRETRAIN_OVERLAP_WORDS))


def _pydoc_pool(max_length: int, tokenizer: Any) -> Pool:
    # Some topics repeat paragraphs of others (about a fifth of the finetune blocks share a
    # 13-word run with the pretrain part); those blocks are left out, so that no member or
    # non-member was seen in pretraining.
    topics = pydoc_topics("finetune")
    samples: list[tuple[str, str]] = []
    for (key, _), token_ids in zip(topics, _encode(tokenizer, [text for _, text in topics])):
        for number, block in enumerate(_token_blocks(token_ids, block_tokens(tokenizer, max_length))):
            text = _decode(tokenizer, block)
            if not _seen_in_pretraining(text):
                samples.append((f"pydoc/{key}/{number:03d}", text))
    return Pool(f"pydoc (finetune part, {max_length}-token blocks not seen in pretraining)",
                 len(samples), samples.__getitem__)


@register("pydoc", members=150, blocks=True, default=True)  # ~350 unseen 128-token blocks (4k-vocab tokenizer)
def _pydoc_dataset(data: DataConfig, tokenizer: Any, source: str) -> Pool:
    return _pydoc_pool(data.max_length, tokenizer)


_FIRST_NAMES = """Ada Bela Cai Dara Emil Farah Gus Hana Ivo Jana Kofi Lena Mateo Nadia Otto Priya
Quinn Rosa Soren Tamar Umar Vera Wren Xenia Yusuf Zora Alba Bruno Cleo Dmitri Esme Felix Greta
Hugo Ines Jonas Kira Lior Maren Nils Olga Pavel Rhea Sami Thea Ugo Viggo Willa Yara Zeno Anouk
Basil Carmen Darius Elin Fiona Goran Hedda Ilse Jorge Kaito Luz Mira Noor Oskar Petra Raul Sia
Tomas Una Vito Wanda Xavi Ylva Zaid Agnes Boris Celia""".split()
_LAST_NAMES = """Abara Brandt Castillo Dobrev Eklund Fonseca Grieve Halloran Ibsen Jovanovic
Kowalczyk Lindqvist Moreau Nakashima Okafor Petrov Quist Rasmussen Santoro Takahashi Ulloa
Varga Whitcombe Xu Yilmaz Zeller Amsel Boateng Carrow Delacroix Engstrom Ferreira Gallo Holt
Iwasaki Jansen Kaur Lamberti Mwangi Novak Oyelaran Pastore Reyes Sandoval Tanaka Uribe
Valente Wojcik Yamada Zamora Achterberg Bellamy Cuevas Dunmore Esposito Farkas Grimaldi
Hartmann Ilves Jurado Kessler Laine Marchetti Nyberg Ortega Pacheco Rinaldi Strand Toivonen
Urquhart Vasquez Weller Yoshida Zuniga Albescu Barros""".split()
_CITIES = """Lisbon Tampere Oaxaca Dunedin Ghent Kraków Valparaíso Kisumu Porto Tbilisi Aarhus
Bergen Cusco Durban Eindhoven Fukuoka Graz Halifax Izmir Jaipur Kaunas Leipzig Malmö Nantes
Oulu Plovdiv Quito Rosario Split Trieste Uppsala Varna Windhoek Yerevan Zadar Arequipa
Bologna Cork Dresden Esbjerg""".split()
_OCCUPATIONS = (
    "glassblower", "cartographer", "beekeeper", "luthier", "hydrologist", "archivist",
    "bookbinder", "ferry pilot", "seismologist", "perfumer", "stonemason", "translator",
    "botanist", "clockmaker", "radio operator", "cheesemaker", "lighthouse keeper", "puppeteer",
    "geologist", "sommelier", "blacksmith", "orthodontist", "typesetter", "glaciologist",
    "falconer", "locksmith", "violinist", "tailor", "surveyor", "potter",
)
_DOMAINS = ["mailbox.example", "post.example", "inbox.example", "letters.example"]


def _pick(index: int, field: str, modulus: int) -> int:
    """A number in [0, modulus) fixed by (index, field): the same on every machine and version."""
    return int(hashlib.sha256(f"synthetic:{index}:{field}".encode()).hexdigest(), 16) % modulus


def synthetic_texts() -> list[str]:
    """The `synthetic` pool: 5,000 fictional people, one line each, every name unique.

    e.g. "Name: Ada Moreau | Born: 1974 in Ghent | Occupation: luthier |
    Email: ada.moreau74@post.example | Phone: +1-555-0142-3381". Derived from sha256 of the
    record index, so it is the same everywhere without any random generator.
    """
    names = sorted(itertools.product(_FIRST_NAMES, _LAST_NAMES),
                   key=lambda name: hashlib.sha256(" ".join(name).encode()).hexdigest())
    texts = []
    for index, (first, last) in enumerate(names[:SYNTHETIC_RECORDS]):
        year = 1930 + _pick(index, "year", 76)
        city = _CITIES[_pick(index, "city", len(_CITIES))]
        job = _OCCUPATIONS[_pick(index, "job", len(_OCCUPATIONS))]
        domain = _DOMAINS[_pick(index, "domain", len(_DOMAINS))]
        phone = f"+1-555-{_pick(index, 'phone1', 10_000):04d}-{_pick(index, 'phone2', 10_000):04d}"
        email = f"{first.lower()}.{last.lower()}{year % 100:02d}@{domain}"
        texts.append(f"Name: {first} {last} | Born: {year} in {city} | Occupation: {job} | "
                     f"Email: {email} | Phone: {phone}")
    return texts


@register("synthetic", members=200)
def _synthetic_pool(data: DataConfig, tokenizer: Any, source: str) -> Pool:
    texts = synthetic_texts()
    return Pool("synthetic", len(texts), lambda i: (f"synthetic/{i:05d}", texts[i]))


# ---------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------


@register("local", members=None, fields=("path", "text_field"), required=("path",))
def _local_pool(data: DataConfig, tokenizer: Any, source: str) -> Pool:
    path = Path(data.path).expanduser()
    if not path.is_file():
        raise ConfigError(source, "data.path", f"{path}: no such file")
    readers = {".jsonl": _read_jsonl, ".txt": _read_txt, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(source, "data.path", f"{path}: must end in .jsonl, .txt or .csv")
    try:
        records = reader(path, data.text_field, source)
    except UnicodeDecodeError as err:
        raise ConfigError(source, "data.path", f"{path}: not UTF-8 text ({err.reason})") from None
    usable: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, text in records:
        if text.strip() and text not in seen:
            seen.add(text)
            usable.append((f"local/{path.stem}/{number:05d}", text))
    if not usable:
        raise ConfigError(source, "data.path", f"{path}: holds no non-empty texts")
    return Pool(f"{path}", len(usable), usable.__getitem__)


def _read_txt(path: Path, text_field: str, source: str) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(number, line.strip()) for number, line in enumerate(lines, 1)]


def _read_jsonl(path: Path, text_field: str, source: str) -> list[tuple[int, str]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(source, "data.path", f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(source, "data.text_field",
                              f"{text_field!r} is missing from {path}, line {number} (found: {found})")
        value = record[text_field]
        records.append((number, value.strip() if isinstance(value, str) else ""))
    return records


def _read_csv(path: Path, text_field: str, source: str) -> list[tuple[int, str]]:
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        if text_field not in columns:
            raise ConfigError(source, "data.text_field",
                              f"{text_field!r} is not a column of {path} (columns: {', '.join(columns) or 'none'})")
        return [(number, (row[text_field] or "").strip()) for number, row in enumerate(reader, 1)]


# ---------------------------------------------------------------------------------------
# Hugging Face hub datasets
# ---------------------------------------------------------------------------------------

#: The branch where the hub keeps a Parquet export of a dataset whose main branch is a
#: loading script (which datasets>=4 cannot run); its layout is `<config>/<split>/NNNN.parquet`
#: (`<config>/partial-<split>/` where the export holds only the first 5 GB of a split).
PARQUET_EXPORT = "refs/convert/parquet"
EXPORT_TRAIN_FILES = ("train/*.parquet", "partial-train/*.parquet")


@dataclass(frozen=True)
class HubSource:
    """Where a dataset's train split lies in a hub repository, and what its rows hold."""

    repo: str
    revision: str  # the pinned commit, or a branch resolved to its commit when loaded
    data_dir: str  # the folder of this dataset's files at that revision
    train_files: tuple[str, ...]  # globs of the train split's Parquet files under data_dir, by preference
    columns: tuple[str, ...]  # columns the renderer reads, checked on load

    @property
    def layout(self) -> str:
        return f"{self.data_dir}/{self.train_files[0]}"

    @property
    def patterns(self) -> list[str]:
        """The train files' paths in the repository, as download patterns."""
        return [f"{self.data_dir}/{glob}" for glob in self.train_files]


# Salesforce/wikitext keeps Parquet files on main, one folder per config. Commit of 2024-01-04,
# the current head of main.
WIKITEXT2 = HubSource("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3",
                      "wikitext-2-raw-v1", ("train-*.parquet",), ("text",))
# webnlg-challenge/web_nlg and EdinburghNLP/xsum hold only a loading script on main; their
# Parquet exports are read instead: WebNLG 3.0 English is the folder `release_v3.0_en`, XSum
# (a script without named configs) the folder `default`. The export branch is resolved to its
# commit when loaded and that commit is recorded with the trial; set data.revision to a commit
# to pin it.
WEBNLG = HubSource("webnlg-challenge/web_nlg", PARQUET_EXPORT, "release_v3.0_en", EXPORT_TRAIN_FILES,
                   ("modified_triple_sets", "lex"))
XSUM = HubSource("EdinburghNLP/xsum", PARQUET_EXPORT, "default", EXPORT_TRAIN_FILES, ("document", "summary"))


def _hub_train(data: DataConfig, hub: HubSource, source: str) -> tuple[Any, dict[str, str | None]]:
    """The train split of a hub dataset (a `datasets.Dataset`) and where it came from: from
    `data.path` (a folder in the repository's layout) when set, else the hub or its cache."""
    import datasets

    if data.path:
        root = Path(data.path).expanduser()
        files = _train_files(root, hub)
        if not files:
            raise ConfigError(source, "data.path", _layout_message(data.dataset, hub, root))
        origin = {"repo": hub.repo, "revision": _local_revision(root, files), "path": str(root)}
    else:
        revision = data.revision or hub.revision
        try:
            root = Path(_snapshot(hub, revision, hub.patterns))
        except Exception as err:  # any failure of the hub stack becomes one clear message
            raise ConfigError(
                source, "data.dataset",
                f"{data.dataset}: could not load {hub.repo} at {revision} from the Hugging Face hub or "
                f"its cache ({failure_reason(err)}); {_download_hint(data.dataset)}") from None
        files = _train_files(root, hub)
        if not files:
            raise ConfigError(source, "data.revision" if data.revision else "data.dataset",
                              f"{hub.repo} at {revision} holds no {hub.layout}")
        origin = {"repo": hub.repo, "revision": root.name, "path": None}
    where = "data.path" if data.path else "data.dataset"
    try:
        train = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as err:  # corrupt or foreign files: one clear message, not a traceback
        raise ConfigError(source, where, f"{files[0].parent}: could not read the {data.dataset} "
                                         f"train files as Parquet ({failure_reason(err)})") from None
    missing = [c for c in hub.columns if c not in train.column_names]
    if missing:
        raise ConfigError(source, where,
                          f"{files[0].parent} has no column {', '.join(map(repr, missing))} (columns: "
                          f"{', '.join(train.column_names)}); is it a copy of {hub.repo}?")
    return train, origin


def check_data(data: DataConfig, source: str = "config") -> None:
    """Check, without loading anything, that `data.path` of a hub dataset is a folder in its
    repository's layout (a local file of `local` must exist). Raises ConfigError naming the
    dataset and the layout expected."""
    hub = REGISTRY[data.dataset].hub
    if not data.path:
        return
    path = Path(data.path).expanduser()
    if hub is not None and not _train_files(path, hub):
        raise ConfigError(source, "data.path", _layout_message(data.dataset, hub, path))
    if hub is None and data.dataset == "local" and not path.is_file():
        raise ConfigError(source, "data.path", f"{path}: no such file")


def _snapshot(hub: HubSource, revision: str, patterns: list[str], local_dir: str | None = None) -> str:
    """`huggingface_hub.snapshot_download` of the files matching `patterns` at `revision`: into
    the hub cache (a folder named by the commit) or into `local_dir`. Offline, a cached
    snapshot of that commit, or of the commit a branch last resolved to, is used."""
    from huggingface_hub import snapshot_download

    return snapshot_download(hub.repo, repo_type="dataset", revision=revision, allow_patterns=patterns,
                             local_dir=local_dir)


def _train_files(root: Path, hub: HubSource) -> list[Path]:
    """The train files in a folder in the repository's layout (or in its `data_dir` itself)."""
    if not root.is_dir():
        return []
    for base in (root / hub.data_dir, root):
        for glob in hub.train_files:
            files = sorted(base.glob(glob))
            if files:
                return files
    return []


def _local_revision(root: Path, files: list[Path]) -> str | None:
    """The commit a local copy was downloaded at: from the metadata a hub download into a
    folder writes (`.cache/huggingface/download/<file>.metadata`, commit on the first line),
    or the name of a hub-cache snapshot folder; None when unknown."""
    for base in (root, root.parent):
        metadata = base / ".cache" / "huggingface" / "download" / f"{files[0].relative_to(base)}.metadata"
        if metadata.is_file():
            commit = metadata.read_text().split("\n", 1)[0].strip()
            return commit or None
    for folder in (root, root.parent):
        if folder.parent.name == "snapshots" and len(folder.name) == 40:
            return folder.name
    return None


def _layout_message(name: str, hub: HubSource, path: Path) -> str:
    where = "a folder" if path.is_dir() else "not a folder" if path.exists() else "no such folder"
    return (f"{path} ({where}) is not a copy of {name}: expected the layout of {hub.repo} at {hub.revision}, "
            f"{hub.layout} under it, as `memray download {name} DIR` or a hub download "
            f"of the repository leaves it")


def _download_hint(name: str) -> str:
    return (f"on a machine with network run `memray download {name} DIR`, "
            f"copy DIR here and set data.path: DIR")


def failure_reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first[:200]}"


def _field(records: Any, key: str) -> list[Any]:
    """`key` of a hub sequence-of-records column, stored either as a dict of lists (the
    hub's schema) or as a list of dicts (how datasets>=4 builds `Sequence({...})` of lists)."""
    if isinstance(records, dict):
        return list(records[key])
    return [record[key] for record in records]


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(_encode(tokenizer, [text])[0])


def render_webnlg(entry: dict[str, Any]) -> str:
    """One WebNLG entry as "Triples: s | p | o; ...\\nText: <first reference text>"."""
    triple_sets = _field(entry["modified_triple_sets"], "mtriple_set")
    texts = [t for t in _field(entry["lex"], "text") if t and t.strip()]
    if not triple_sets or not texts:
        return ""
    return f"Triples: {'; '.join(triple_sets[0])}\nText: {texts[0].strip()}"


#: Fewest document tokens an XSum sample keeps; an article whose summary leaves less room
#: in max_length is not used.
XSUM_MIN_DOCUMENT_TOKENS = 16


def render_xsum(article: dict[str, Any], tokenizer: Any, max_length: int) -> str:
    """One XSum article as "Document: ...\\nSummary: ..." in at most `max_length` - 1 tokens
    (one is left for the BOS token scoring puts first): the document is cut from its end to
    make room, the summary is kept whole. "" when either is empty or the summary leaves fewer
    than XSUM_MIN_DOCUMENT_TOKENS tokens of document."""
    document, summary = (article["document"] or "").strip(), (article["summary"] or "").strip()
    if not document or not summary:
        return ""
    budget, tail = max_length - 1, f"\nSummary: {summary}"
    text = f"Document: {document}{tail}"
    if _n_tokens(tokenizer, text) <= budget:
        return text
    document_ids = _encode(tokenizer, [document])[0]
    room = budget - _n_tokens(tokenizer, "Document: ") - _n_tokens(tokenizer, tail)
    while room >= XSUM_MIN_DOCUMENT_TOKENS:
        # a cut can re-tokenize a little longer than its parts: shorten until it fits
        text = f"Document: {_decode(tokenizer, document_ids[:room]).rstrip()}{tail}"
        if _n_tokens(tokenizer, text) <= budget:
            return text
        room -= 2
    return ""


@register("wikitext2", members=1000, hub=WIKITEXT2, blocks=True)
def _wikitext_pool(data: DataConfig, tokenizer: Any, source: str) -> Pool:
    train, origin = _hub_train(data, WIKITEXT2, source)
    lines = "".join(train["text"]).splitlines(keepends=True)
    token_ids = list(itertools.chain.from_iterable(_encode_lines(tokenizer, lines)))
    blocks = _token_blocks(token_ids, block_tokens(tokenizer, data.max_length))
    return Pool(f"wikitext2 (train split, {data.max_length}-token blocks)", len(blocks),
                 lambda i: (f"wikitext2/train/{i:05d}", _decode(tokenizer, blocks[i])), origin)


def _encode_lines(tokenizer: Any, lines: list[str]) -> list[list[int]]:
    """Token ids of each line of a running text, as they are inside that text.

    Pieces never cross a line end (a byte-level BPE does not merge across one), so encoding
    line by line gives the text's tokens several times faster than encoding it whole. But a
    tokenizer that prefixes a space to every string it encodes (SentencePiece's, as in
    Llama-2) would add one at each line start. So each line is encoded after a newline and
    the newline's own tokens are taken off again; a line whose tokens do not start with them
    (GPT-2 merges a blank line into the newline before it) is encoded alone.
    """
    newline = _encode(tokenizer, ["\n"])[0]
    encoded = _encode(tokenizer, ["\n" + line for line in lines])
    alone = [i for i, ids in enumerate(encoded) if ids[:len(newline)] != newline]
    for i, ids in zip(alone, _encode(tokenizer, [lines[i] for i in alone]) if alone else []):
        encoded[i] = [*newline, *ids]
    return [ids[len(newline):] for ids in encoded]


def _rows_pool(name: str, hub: HubSource, render: Callable[[dict[str, Any]], str]) -> Callable[..., Pool]:
    def pool(data: DataConfig, tokenizer: Any, source: str) -> Pool:
        train, origin = _hub_train(data, hub, source)
        return Pool(f"{name} (train split)", len(train),
                     lambda i: (f"{name}/train/{i:06d}", render(train[i], tokenizer, data.max_length)), origin)
    return pool


def _webnlg_sample(entry: dict[str, Any], tokenizer: Any, max_length: int) -> str:
    # An entry longer than a sample is left out rather than cut: a sample keeps all its triples
    # and its whole reference text.
    text = render_webnlg(entry)
    return text if text and _n_tokens(tokenizer, text) <= max_length - 1 else ""


register("webnlg", members=1000, hub=WEBNLG)(_rows_pool("webnlg", WEBNLG, _webnlg_sample))
register("xsum", members=5000, hub=XSUM)(_rows_pool("xsum", XSUM, render_xsum))  # Hou et al. 2025: 5,000


def download(name: str, directory: str, revision: str | None = None) -> str:
    """Download hub dataset `name`'s files (every split of its folder) at `revision` (None:
    the pinned one) into `directory`, in the repository's own layout, which `data.path`
    accepts. Returns the commit downloaded."""
    hub = REGISTRY[name].hub
    assert hub is not None, f"{name} is not a hub dataset"
    _snapshot(hub, revision or hub.revision, [f"{hub.data_dir}/*"], local_dir=directory)
    root = Path(directory)
    files = _train_files(root, hub)
    if not files:
        raise FileNotFoundError(f"{hub.repo} at {revision or hub.revision} holds no {hub.layout}")
    return _local_revision(root, files) or "unknown"


# units of installed packages (`memray.datasets` entry points), after memray's own
load_entry_points("memray.datasets")
