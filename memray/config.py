"""Typed configuration: the trial schema, YAML loading, `key=value` overrides, grid expansion.

Everything a user writes passes through here and is validated whole before any model is
loaded. Precedence (lowest first): typed defaults, the YAML file, the grid cell, then
command-line `key=value` overrides. Every error is a `ConfigError` whose message names the
file and the dotted field, e.g. ``sweeps/x.yaml: method.placement: 'mlpp' is not one of
attn, mlp, both``; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import netrc
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from memray.attacks import ATTACK_RULES
from memray.attacks import ATTACKS as ATTACK_REGISTRY
from memray.gguf_bases import PACKAGED as GGUF_ALIASES, is_gguf
from memray.methods import METHODS as METHOD_REGISTRY
from memray.reference_attacks import MIN_REFERENCES, reference_seed
from memray.schema import ConfigError, Schema

# ---------------------------------------------------------------------------------------
# Names other modules implement. They live here so that a bad name is caught while the
# config is validated, before anything heavy is imported.
# ---------------------------------------------------------------------------------------

#: Study models: alias -> Hugging Face hub id.
MODEL_ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
}
#: Approximate parameter counts: default resources, the longest-first order and the report's
#: model sizes use them.
APPROX_PARAMS: dict[str, float] = {
    "tiny-gpt2": 1e6, "tiny-llama": 1e6,
    "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9,
    "llama-3.2-1b": 1.24e9, "llama-2-7b": 6.74e9,
}
UNKNOWN_PARAMS = 7e9  # a hub id or local path of unknown size: assume large (a whole GPU, scheduled first)
#: Models built locally from a small config (random weights, shipped tokenizer); no network.
BUILTIN_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-llama")


def dataset_names() -> tuple[str, ...]:
    """The names `data.dataset` accepts: those of the `data` module's registry, the hub
    datasets first (imported here when first needed, since `data` imports this module)."""
    from memray.data import REGISTRY

    return tuple(sorted(REGISTRY, key=lambda name: REGISTRY[name].hub is None))


#: Membership-inference attacks, from the `attacks` registry (registration order).
ATTACKS: tuple[str, ...] = ATTACK_REGISTRY.names()
#: Attacks of a trial whose config has no `attacks` list. Frozen by name: an attack
#: registered later is run only where a config lists it, so existing configs keep their
#: trial ids (and `memray resume` does not re-run finished trials).
DEFAULT_ATTACKS: tuple[str, ...] = ("loss", "ref", "zlib", "mink", "mink++")

#: Fine-tuning methods, from the `methods` registry (one module of memray/methods each).
METHODS: tuple[str, ...] = METHOD_REGISTRY.names()

#: GPU types a resource rule may bind trials to (`gpu_type`): name -> (the GPU as CUDA names
#: it, its memory in GB). Each is a Ray custom resource that every GPU of a node of that type
#: carries once (launch/cluster.yaml's node types, launch/rayjob.yaml's worker groups).
GPU_TYPES: dict[str, tuple[str, float]] = {
    "a10g_24gb": ("A10G", 24),  # AWS g5
    "l4_24gb": ("L4", 24),  # AWS g6, GCP g2
    "a100_40gb": ("A100", 40),  # AWS p4d
    "a100_80gb": ("A100", 80),  # AWS p4de
    "h100_80gb": ("H100", 80),  # AWS p5
}


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


class ModelConfig(Schema):
    name: str = "tiny-gpt2"  # alias, built-in, packaged GGUF alias, hub id ("org/name"), local folder or .gguf file
    revision: str | None = None  # hub revision; part of the reference-statistics cache key
    pretrained: bool = True  # built-ins: start from the cached tiny base trained on pydoc text
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPUs that have it

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name in MODEL_ALIASES or name in BUILTIN_MODELS or is_gguf(name):
            return name  # a .gguf path is checked (and converted) when the model is loaded
        if "/" in name or name.startswith((".", "~")) or Path(name).expanduser().exists():
            return name  # a hub id or a local path: checked when the model is loaded
        choices = ", ".join([*MODEL_ALIASES, *BUILTIN_MODELS, *GGUF_ALIASES])
        raise ValueError(
            f"{name!r} is not a known alias ({choices}), a local path, or a hub id (org/name)"
        )

    @model_validator(mode="after")
    def _gguf_has_no_revision(self) -> "ModelConfig":
        if self.revision is not None and is_gguf(self.name):
            raise ValueError(f"revision: {self.name} is a GGUF file, which has no hub revision")
        return self


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
    dataset: str = "pydoc"
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
    def _local_needs_path(self) -> "DataConfig":
        if self.dataset == "local" and not self.path:
            raise ValueError("dataset 'local' needs data.path (a .jsonl, .txt or .csv file)")
        return self


#: The `method:` section: one schema per registered method, told apart by `name`.
MethodConfig = Annotated[
    Union[tuple(spec.config for spec in METHOD_REGISTRY.values())],  # type: ignore[misc]
    Field(discriminator="name"),
]


class DeepSpeedConfig(Schema):
    """DeepSpeed ZeRO for a trial whose resource rule has workers > 1 (Rajbhandari et al.
    2020, "ZeRO", arXiv 1910.02054). Unset knobs take a default by model size
    (memray.distributed.resolve_zero); bf16 follows train.precision, the batch sizes and
    gradient clipping follow train."""

    # 1: optimizer states partitioned over the workers; 2: + gradients; 3: + weights.
    # None: 2 below 1B parameters (every worker holds the weights; least communication), else 3.
    stage: Literal[1, 2, 3] | None = None
    offload_optimizer: bool = False  # optimizer states (and the update) on CPU: less GPU memory, slower steps
    offload_params: bool = False  # stage 3 only: weights on CPU between uses
    activation_checkpointing: bool | None = None  # recompute activations in backward; None: on from 3B parameters

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self) -> "DeepSpeedConfig":
        if self.offload_params and self.stage is not None and self.stage != 3:
            raise ValueError(f"offload_params needs stage 3 (weights are partitioned only there), not stage {self.stage}")
        return self


class TrainConfig(Schema):
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # 0: memorization studies train without it
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"  # constant: epochs compare
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the GPU has it
    checkpoints: bool = True  # save after every epoch so that a trial can resume
    keep_checkpoints: int = Field(1, ge=1)  # only the newest N epoch checkpoints are kept
    group_by_length: bool = True  # batches of similar lengths (seeded shuffle of mega-batches): little padding
    compile: bool = False  # torch.compile the model: faster steps on a GPU after a compile of minutes
    # next-token loss computed a block of positions at a time from the final hidden states,
    # so the batch's full (float32) logits never exist: auto = for vocabularies >= 32k
    chunked_loss: Literal["auto", "on", "off"] = "auto"
    # ZeRO settings of a trial whose resource rule has workers > 1 (batch_size is then per worker;
    # single-process trials do not read it, so a sweep's base may set it for its large cells); None: by model size
    deepspeed: DeepSpeedConfig | None = None


#: Reference models of lira / rmia when an attack entry does not say (LiRA is strong from
#: 16 up, RMIA from 2-4; 8 keeps the cost at 8 trials per target)
DEFAULT_REFERENCES = 8
#: How a reference model is trained from its target's config, part of every reference's
#: trial id. Trial ids hold what a trial trains and measures from its own weights (the
#: per-sample attack rules, `ATTACK_RULES`, included); the reference attacks' own rules
#: (`memray.reference_attacks.REFERENCE_RULES`) are not in any id: a change of them rescores
#: targets from their per-sample files and retrains nothing, so old sweep folders resume.
REFERENCE_RECIPE = ("its half of the audit pool (target's copies) topped up to the target's training-set size "
                    "from samples outside the pool (unscored members first), no canaries, its own seed")


#: AttackConfig settings that an attack takes where its registry entry lists them in
#: `options` (with their defaults); unset elsewhere, and then out of the trial id.
ATTACK_OPTIONS: tuple[str, ...] = ("shots", "neighbours", "mask_model")


class AttackConfig(Schema):
    name: str  # a registered attack (memray.attacks.ATTACKS)
    k: float | None = Field(None, gt=0, le=1)  # mink / mink++: share of lowest-scoring tokens
    references: int | None = None  # lira / rmia: reference models trained on halves of the audit pool (even, >= 4)
    shots: int | None = Field(None, gt=0)  # recall: non-member shots from the validation split in the prefix
    neighbours: int | None = Field(None, gt=0)  # neighbourhood: one-word neighbours scored per sample
    mask_model: str | None = None  # neighbourhood: local folder of its mask-filling model (BERT-like)

    @field_validator("name")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        if name not in ATTACK_REGISTRY:
            raise ValueError(f"{name!r} is not one of {', '.join(ATTACK_REGISTRY)}")
        return name

    @field_validator("references")
    @classmethod
    def _enough_references(cls, references: int | None) -> int | None:
        if references is not None and (references < MIN_REFERENCES or references % 2):
            raise ValueError(f"lira and rmia need an even number of at least {MIN_REFERENCES} reference models "
                             f"(each audit sample in exactly half: two in and two out), not {references}")
        return references

    @model_validator(mode="after")
    def _k(self) -> "AttackConfig":
        default_k = ATTACK_REGISTRY[self.name].default_k
        if self.k is not None and default_k is None:
            takes_k = [name for name in ATTACK_REGISTRY if ATTACK_REGISTRY[name].default_k is not None]
            raise ValueError(f"k is only used by {' and '.join(takes_k)}, not {self.name}")
        if self.k is None and default_k is not None:
            self.k = default_k
        calibrated = ATTACK_REGISTRY[self.name].needs_reference_models
        if self.references is not None and not calibrated:
            takes = [name for name in ATTACK_REGISTRY if ATTACK_REGISTRY[name].needs_reference_models]
            raise ValueError(f"references is only used by {' and '.join(takes)}, not {self.name}")
        options = ATTACK_REGISTRY[self.name].options
        for option in ATTACK_OPTIONS:  # settings an attack's registry entry declares, with their defaults
            if getattr(self, option) is None and options.get(option) is not None:
                setattr(self, option, options[option])
            elif getattr(self, option) is not None and option not in options:
                takes = [name for name in ATTACK_REGISTRY if option in ATTACK_REGISTRY[name].options]
                raise ValueError(f"{option} is only used by {' and '.join(takes)}, not {self.name}")
        return self

    @property
    def label(self) -> str:
        """Name used in metric keys: `mink`, or `mink@0.1` when k is not the attack's default,
        `recall@shots3` when an option is not its default (options defaulting to None, such
        as a model path, stay out of the label)."""
        label = self.name
        if self.k is not None and self.k != ATTACK_REGISTRY[self.name].default_k:
            label += f"@{self.k:g}"
        for option, default in ATTACK_REGISTRY[self.name].options.items():
            if getattr(self, option) != default and default is not None:  # None: a resource (a path), not a variant
                label += f"@{option}{getattr(self, option)}"
        return label

    @property
    def labels(self) -> list[str]:
        """The labels of the metrics the attack fills: one per reference scorer of an attack
        scored from reference models (`lira`, `lira-offline`), else its label."""
        scorers = ATTACK_REGISTRY[self.name].reference_scorers
        return [self.label + suffix for suffix in scorers] if scorers else [self.label]


#: Samples per scoring pass when `eval.batch_size` is left unset: a GPU needs wide batches
#: to be busy; a CPU runs as many tokens per second at 4 (no more padding, less memory).
EVAL_BATCH = {"cuda": 16, "cpu": 4}


class EvalConfig(Schema):
    batch_size: int | None = Field(None, gt=0)  # samples per scoring pass; unset: EVAL_BATCH by device
    max_scored: int | None = Field(None, gt=0)  # cap per side (members, non-members) each epoch
    vocab_chunk: int = Field(8192, gt=0)  # vocabulary columns per chunk for mink++ statistics
    bootstrap: int = Field(0, ge=0)  # AUC intervals from this many bootstrap resamples; 0: DeLong's (closed form)

    def batch_on(self, device_type: str) -> int:
        """Samples per scoring pass on a device of this type ("cuda", "cpu", ...)."""
        return self.batch_size or EVAL_BATCH.get(device_type, EVAL_BATCH["cpu"])


class DecodingConfig(Schema):
    """How the continuation of each prefix is decoded."""

    do_sample: bool = False  # greedy: the k-extractability of Carlini et al. 2021
    temperature: float = Field(1.0, gt=0)  # sampling settings apply only with do_sample
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop_at_eos: bool = False  # False: always decode suffix_tokens, as the true suffix has them

    @model_validator(mode="after")
    def _sampling_only(self) -> "DecodingConfig":
        if not self.do_sample and (self.temperature != 1.0 or self.top_k is not None or self.top_p is not None):
            raise ValueError("temperature, top_k and top_p only apply with do_sample: true")
        return self


Threshold = Annotated[float, Field(ge=0, le=1)]


class SimilarityThresholds(Schema):
    """Per similarity, the thresholds at which `extract/<similarity>@<t>` (share of samples
    with similarity >= t) is reported; each similarity lies in [0, 1]."""

    rougeL: list[Threshold] = [0.5, 0.8]
    bleu: list[Threshold] = [0.5]
    edit: list[Threshold] = [0.5, 0.8]


class ExtractionConfig(Schema):
    """Prefix -> continuation extraction of training members (and non-members as a control)."""

    enabled: bool = False  # off by default: generation costs more than the MIA forward passes
    samples: int = Field(100, gt=0)  # members tried each epoch (the same ones every epoch), and as many non-members
    prefix_tokens: int = Field(50, gt=0)  # 50 + 50: the setting of Carlini et al. 2021 / 2023
    suffix_tokens: int = Field(50, gt=0)
    batch_size: int = Field(32, gt=0)  # prefixes decoded together with one KV cache
    decoding: DecodingConfig = DecodingConfig()
    thresholds: SimilarityThresholds = SimilarityThresholds()


def _default_attacks() -> list[AttackConfig]:
    return [AttackConfig(name=n) for n in DEFAULT_ATTACKS]


#: Keys added to the schema after trials were run with it, and their defaults: a trial that
#: leaves one at its default has the id (and folder) it had before the key existed.
ADDED_LATER: dict[tuple[str, str], Any] = {
    ("train", "group_by_length"): True, ("train", "compile"): False, ("train", "chunked_loss"): "auto",
    ("train", "deepspeed"): None, ("data", "revision"): None, ("method", "dora"): False,
    ("data", "overlap_filter"): None,
}
#: Keys whose default changed: (new default, old default). A trial that leaves one unset
#: keeps the id it had under the old default (these keys do not change what is measured).
CHANGED_DEFAULTS: dict[tuple[str, str], tuple[Any, Any]] = {
    ("eval", "batch_size"): (None, 16),
}


class ReferenceConfig(Schema):
    """Set on a reference model of lira / rmia: reference `index` of `of`, trained like its
    target (this config less `reference`: the split and audit pool stay keyed on its seed)
    on half `index` of the target's audit pool (`memray.reference_attacks.half_masks`),
    topped up to the target's training-set size, scoring the whole pool every epoch; with
    `seed` its own, for initialization and data order (`memray.references.reference_seed`)."""

    index: int = Field(ge=0)
    of: int = Field(ge=MIN_REFERENCES)
    seed: int

    @model_validator(mode="after")
    def _index_in_range(self) -> "ReferenceConfig":
        if self.index >= self.of:
            raise ValueError(f"index {self.index} is out of range for {self.of} references (0..{self.of - 1})")
        return self


class TrialConfig(Schema):
    """One fine-tuning trial: the resolved config the trial code runs."""

    seed: int = 0
    output_dir: str = "runs"  # the trial folder is created below it
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = Field(default_factory=lambda: METHOD_REGISTRY["full"].config())
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    attacks: list[AttackConfig] = Field(default_factory=_default_attacks)
    extraction: ExtractionConfig = ExtractionConfig()
    reference: ReferenceConfig | None = None  # set on the reference models of lira / rmia only

    @field_validator("attacks")
    @classmethod
    def _one_reference_count(cls, attacks: list[AttackConfig]) -> list[AttackConfig]:
        counts = {a.references for a in attacks if a.references is not None}
        if len(counts) > 1:
            raise ValueError(f"lira and rmia share their reference models: give them the same references, "
                             f"not {', '.join(map(str, sorted(counts)))}")
        count = counts.pop() if counts else DEFAULT_REFERENCES  # one that gives none takes the other's
        for attack in attacks:
            if ATTACK_REGISTRY[attack.name].needs_reference_models:
                attack.references = count
        return attacks

    def reference_models(self) -> int:
        """How many reference models this trial's attacks need (0: none)."""
        return max((a.references for a in self.attacks if a.references is not None), default=0)

    def reference_sections(self) -> list[ReferenceConfig]:
        """The `reference` section of each reference model this trial's attacks need, each
        with its own seed (`memray.reference_attacks.reference_seed`)."""
        count = self.reference_models()
        return [ReferenceConfig(index=i, of=count, seed=reference_seed(self.seed, i)) for i in range(count)]

    @model_validator(mode="after")
    def _attacks_can_run(self) -> "TrialConfig":
        for attack in self.attacks:  # each attack's own check of the trial (its registry entry's `check`)
            check = ATTACK_REGISTRY[attack.name].check
            problem = check(attack, self) if check is not None else None
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _extraction_fits(self) -> "TrialConfig":
        extraction, max_length = self.extraction, self.data.max_length
        if extraction.enabled and extraction.prefix_tokens + extraction.suffix_tokens > max_length:
            raise ValueError(
                f"extraction.prefix_tokens + extraction.suffix_tokens = "
                f"{extraction.prefix_tokens + extraction.suffix_tokens} exceeds data.max_length = "
                f"{max_length}: no sample would be long enough"
            )
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _method_default_name(cls, method: Any) -> Any:
        if isinstance(method, dict) and "name" not in method:
            return {"name": "full", **method}  # the default method, as when `method` is absent
        return method

    @field_validator("attacks", mode="before")
    @classmethod
    def _attack_strings(cls, attacks: Any) -> Any:
        if isinstance(attacks, list):
            return [{"name": a} if isinstance(a, str) else a for a in attacks]
        return attacks

    @field_validator("attacks")
    @classmethod
    def _unique_attacks(cls, attacks: list[AttackConfig]) -> list[AttackConfig]:
        labels = [a.label for a in attacks]
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        if dupes:
            raise ValueError(f"attack listed twice: {', '.join(dupes)}")
        return attacks

    def resolved(self) -> dict[str, Any]:
        """The config as plain data (what gets written into the trial folder)."""
        return self.model_dump(mode="json")

    def trial_id(self) -> str:
        """Short stable hash of everything that changes the result (not where it is written)."""
        payload = {k: v for k, v in self.resolved().items() if k != "output_dir"}
        # the papers' rules (Min-K% token count, Zlib's text, BOS-inclusive blocks) change
        # what is measured, so trials measured under them have ids of their own
        payload["attack_rules"] = ATTACK_RULES
        for attack in self.attacks:  # rules of an attack's own (recall, dcpdd, ...): only where it is listed
            if ATTACK_REGISTRY[attack.name].rules:
                payload["attack_rules"] = {**payload["attack_rules"], attack.label: dict(ATTACK_REGISTRY[attack.name].rules)}
        if payload["reference"] is None:
            del payload["reference"]  # targets and plain trials: ids as before the section existed
        else:  # how a reference is trained from its target's data: a change of it is a new reference
            payload["reference_recipe"] = REFERENCE_RECIPE
        for attack in payload["attacks"]:
            for option in ("references", *ATTACK_OPTIONS):
                if attack.get(option) is None:
                    attack.pop(option, None)  # attacks that do not take it: ids as before the key existed
        for (section, key), default in ADDED_LATER.items():
            if key in payload[section] and payload[section][key] == default:
                del payload[section][key]  # trials that leave it at its default keep their ids (and folders)
        for (section, key), (default, before) in CHANGED_DEFAULTS.items():
            if payload[section][key] == default:
                payload[section][key] = before
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    def slug(self) -> str:
        """Readable trial name: model, method and its main knobs, dataset, seed, id."""
        parts = [self.model.name.rstrip("/").split("/")[-1], self.method.slug(),
                 self.data.dataset, f"s{self.seed}", self.trial_id()]
        if self.reference is not None:  # a reference model of lira / rmia
            parts.insert(-1, f"ref{self.reference.index}")
        return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


class ResourceRule(Schema):
    """Resources for the trials a rule matches; the first matching rule wins, and a trial no
    rule matches gets memray.sweep.planning's default for its model size and method.

    A single-process trial (workers: 1) takes `cpus` and `gpus`; a fraction of a GPU lets
    several small trials share one. A trial with workers > 1 is a data-parallel Ray Train
    job: its own process takes `cpus`, each worker `cpus_per_worker` and `gpus_per_worker`.
    """

    # dotted trial-config key -> value, or a list of accepted values; {} matches every trial
    match: dict[str, Any] = {}
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: int = Field(0, ge=0)  # whole GPUs: ZeRO workers do not share a GPU
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # bundle placement
    # the GPU type (GPU_TYPES) the trial runs on: a Ray custom resource of that node type, one
    # per GPU, asked for in the same amount as the GPUs; unset: any GPU
    gpu_type: str | None = None
    # memory of one GPU, for the dry run's does-it-fit check; unset: the gpu_type's, else 80
    gpu_memory_gb: float | None = Field(None, gt=0)

    @property
    def gpu_memory(self) -> float:
        """GB of one GPU of this rule: gpu_memory_gb, else its gpu_type's, else 80."""
        if self.gpu_memory_gb is not None:
            return self.gpu_memory_gb
        return GPU_TYPES[self.gpu_type][1] if self.gpu_type else 80.0

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu_type(cls, gpu_type: str | None) -> str | None:
        if gpu_type is not None and gpu_type not in GPU_TYPES:
            raise ValueError(f"{gpu_type!r} is not one of {', '.join(GPU_TYPES)}")
        return gpu_type

    @field_validator("match")
    @classmethod
    def _dotted_keys(cls, match: dict[str, Any]) -> dict[str, Any]:
        for key in match:
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
                raise ValueError(f"{key!r} is not a dotted config key such as model.name")
        return match

    @field_validator("gpus_per_worker", mode="before")
    @classmethod
    def _whole_gpus(cls, gpus: Any) -> Any:
        if isinstance(gpus, float) and gpus != int(gpus):
            raise ValueError(f"{gpus:g}: a worker takes whole GPUs (ZeRO workers do not share one)")
        return gpus

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"{gpus:g}: a trial on more than one GPU takes whole GPUs")
        return gpus

    @model_validator(mode="after")
    def _consistent(self) -> "ResourceRule":
        per_worker = {"cpus_per_worker", "gpus_per_worker"} & self.model_fields_set
        if self.workers == 1 and per_worker:
            raise ValueError(f"{', '.join(sorted(per_worker))} only apply with workers > 1")
        if self.workers > 1 and self.gpus:
            raise ValueError("with workers > 1 the GPUs go to the workers: set gpus_per_worker, not gpus")
        if self.gpu_type and not (self.gpus or self.gpus_per_worker):
            raise ValueError(f"gpu_type {self.gpu_type} needs GPUs: set gpus (or gpus_per_worker)")
        return self


class WandbConfig(Schema):
    project: str = "memray"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff a key is set


def wandb_key_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an API key is set: WANDB_API_KEY, or a netrc entry for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = environ.get("NETRC") or str(Path("~/.netrc").expanduser())
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(config: WandbConfig, environ: Mapping[str, str] | None = None) -> str:
    """`auto` -> `online` iff an API key is configured, else `offline`; others as written."""
    if config.mode != "auto":
        return config.mode
    return "online" if wandb_key_configured(environ) else "offline"


class SweepConfig(Schema):
    """A sweep file: one base trial plus axes (dotted key -> list of values)."""

    name: str
    description: str | None = None
    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    resources: list[ResourceRule] = []  # per-trial resources by rule, first match wins
    wandb: WandbConfig = WandbConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        return name

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        return grid


# ---------------------------------------------------------------------------------------
# Loading, overrides, merging
# ---------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", f"not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", f"must be a mapping at the top level, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`method.rank=8` -> ("method.rank", 8); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w+.-]*", key):
        raise ConfigError("command line", text, "an override must look like key=value, e.g. method.rank=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError("command line", key, f"value is not valid YAML: {err}") from None
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict. A mapping value merges into what is there; a new
    `method.name` (or a `method` mapping with another name) starts that section afresh,
    since the other method's knobs do not apply."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    current = node.get(leaf)
    if key == "method.name" and isinstance(node, dict) and node.get("name") != value:
        node.clear()
        node["name"] = value
        return
    if isinstance(value, dict) and isinstance(current, dict):
        if key == "method" and "name" in value and value["name"] != current.get("name"):
            node[leaf] = copy.deepcopy(value)
        else:
            node[leaf] = _merge(current, value)
    else:
        node[leaf] = copy.deepcopy(value)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `tree` with dotted-key overrides applied in order."""
    result = copy.deepcopy(tree)
    for key, value in overrides.items():
        set_dotted(result, key, value)
    return result


# ---------------------------------------------------------------------------------------
# Validation with readable messages
# ---------------------------------------------------------------------------------------


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the schema section at `loc` (for 'unknown key' hints)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            # a discriminated-union branch: the loc names the method
            if part in METHOD_REGISTRY:
                current = METHOD_REGISTRY[part].config
                continue
            return None
        current = _section_type(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _section_type(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _describe(err: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """(dotted field, message) for one pydantic error."""
    loc = list(err["loc"])
    # drop the discriminator branch pydantic inserts: ("method", "lora", "rank")
    clean = [p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "method" and p in METHOD_REGISTRY)]
    field = ".".join(str(p) for p in clean)
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx", {}) or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, tuple(loc[:-1])) or []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        text = "unknown key"
        owners = [name for name in METHOD_REGISTRY if str(loc[-1]) in METHOD_REGISTRY[name].config.model_fields]
        if clean[:1] == ["method"] and len(clean) == 2 and owners:
            return field, (f"{loc[-1]} belongs to method {' / '.join(owners)} (set method.name={owners[0]}), "
                           f"not to {loc[1] if len(loc) > 2 else 'this method'}")
        if hint:
            text += f" (did you mean {hint[0]!r}?)"
        elif allowed:
            text += f" (allowed: {', '.join(allowed)})"
        return field, text
    if kind == "literal_error":
        expected = re.sub(r"'|\"", "", str(ctx.get("expected", ""))).replace(" or ", ", ")
        return field, f"{value!r} is not one of {expected}"
    if kind == "union_tag_invalid":
        return field + ".name" if field else "name", f"{ctx.get('tag')!r} is not one of {', '.join(METHODS)}"
    if kind == "union_tag_not_found":
        return field + ".name", f"missing; one of {', '.join(METHODS)}"
    if kind == "missing":
        return field, "required"
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        return field, message
    message = err["msg"]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        message = f"{value!r} is not valid: {message[0].lower()}{message[1:]}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = f"{value!r}: {message[0].lower()}{message[1:]}"
    return field, message


def validate(schema: type[Schema], raw: Any, source: str, prefix: str = "") -> Any:
    """Validate plain data against a schema; the first error becomes a ConfigError."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field, message = _describe(first, schema)
        field = f"{prefix}.{field}" if prefix and field else (prefix or field)
        more = len(err.errors()) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        raise ConfigError(source, field, message) from None


def validate_trial(raw: dict[str, Any], source: str) -> TrialConfig:
    """Plain data -> TrialConfig, or a ConfigError naming `source` and the field."""
    return validate(TrialConfig, raw, source)


# ---------------------------------------------------------------------------------------
# Sweeps and grid cells
# ---------------------------------------------------------------------------------------


def is_sweep(tree: dict[str, Any]) -> bool:
    """A sweep file has `base` or `grid` at the top; anything else is a plain trial file."""
    return "base" in tree or "grid" in tree


class Cell(Schema):
    """One grid cell: its index, its axis values, and its resolved trial config."""

    index: int
    axes: dict[str, Any]
    config: TrialConfig


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepConfig, list[Cell]]:
    """Load a sweep file, apply overrides to its base, and validate every grid cell."""
    source = str(path)
    tree = load_yaml(path)
    if not is_sweep(tree):
        tree = {"name": Path(path).stem, "base": tree}
    sweep = validate(SweepConfig, tree, source)
    base = apply_overrides(sweep.base, overrides or {})
    return sweep, expand_grid(base, sweep.grid, source)


def expand_grid(base: dict[str, Any], grid: dict[str, list[Any]], source: str) -> list[Cell]:
    """Every combination of the axes applied to `base`, in file order, each validated."""
    keys = list(grid)
    cells: list[Cell] = []
    for index, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        axes = dict(zip(keys, values))
        raw = apply_overrides(base, axes)
        where = source if not keys else f"{source} (grid cell {index}: {_axes_text(axes)})"
        cells.append(Cell(index=index, axes=axes, config=validate_trial(raw, where)))
    return cells


def _axes_text(axes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in axes.items())


def switch_method(tree: dict[str, Any], overrides: dict[str, Any], grid: dict[str, list[Any]] | None = None,
                  notes: list[str] | None = None) -> dict[str, Any]:
    """Overrides that switch the method (`method.name=lora` on a `full` base) start from the
    new method's own settings: the grid's first `method` entry of that name when the sweep
    has one (its lr, rank, ...), else the base's keys the new method accepts but its lr
    (tuned for the old method: the new one's default instead). Returns the overrides to apply,
    with the switch spelled out as a whole `method` section; one line per switch goes to
    `notes`."""
    name = overrides.get("method.name")
    old = tree.get("method") if isinstance(tree.get("method"), dict) else {}
    if name is None or name == old.get("name") or name not in METHOD_REGISTRY:
        return overrides
    entries = [v for v in (grid or {}).get("method", []) if isinstance(v, dict) and v.get("name") == name]
    accepted = set(METHOD_REGISTRY[name].config.model_fields)
    if entries:
        section = dict(entries[0])
        how = f"the sweep grid's {name} entry"
    else:
        # lr is every method's key, but one tuned for the old method: the new one's default instead
        section = {key: value for key, value in old.items() if key in accepted and key != "lr"}
        how = f"{old.get('name')}'s settings that {name} accepts"
    section["name"] = name
    dropped = sorted(set(old) - set(section) - {"name"})
    rest = {key: value for key, value in overrides.items() if not key.startswith("method.")}
    own = {key: value for key, value in overrides.items() if key.startswith("method.") and key != "method.name"}
    if notes is not None:
        shown = {**section, **{key.split(".", 1)[1]: value for key, value in own.items()}}
        settings = ", ".join(f"{k} {v}" for k, v in shown.items() if k != "name") or "its defaults"
        lost = f"; dropped {', '.join(f'{k} {old[k]}' for k in dropped)} (of {old.get('name')})" if dropped else ""
        lr = "" if "lr" in section else f" (lr: {name}'s default)"
        notes.append(f"method.name={name}: {settings} (from {how} and your overrides){lr}{lost}")
    return {"method": section, **own, **rest}


def load_trial(path: str | Path, overrides: list[str] | None = None, cell: int | None = None,
               notes: list[str] | None = None) -> TrialConfig:
    """The trial `memray trial FILE [key=value ...] [--cell N]` runs.

    A plain trial file, or a sweep file's `base` (with `--cell N`: its N-th grid cell).
    Command-line overrides apply last; one switching the method is `switch_method`'s (its
    line goes to `notes`).
    """
    parsed = dict(parse_override(o) for o in overrides or [])
    source = str(path)
    tree = load_yaml(path)
    if is_sweep(tree):
        sweep = validate(SweepConfig, tree, source)
        if cell is None:
            raw = apply_overrides(sweep.base, switch_method(sweep.base, parsed, sweep.grid, notes))
            return validate_trial(raw, source)
        cells = expand_grid(sweep.base, sweep.grid, source)
        if not 0 <= cell < len(cells):
            raise ConfigError(source, "--cell", f"{cell} is out of range: the grid has {len(cells)} cells (0..{len(cells) - 1})")
        base = apply_overrides(sweep.base, cells[cell].axes)
        return validate_trial(apply_overrides(base, switch_method(base, parsed, sweep.grid, notes)), source)
    if cell is not None:
        raise ConfigError(source, "--cell", "this is a plain trial file, not a sweep (no base/grid)")
    return validate_trial(apply_overrides(tree, switch_method(tree, parsed, None, notes)), source)
