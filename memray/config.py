"""The trial and sweep schemas, assembled from the units' own sections.

A unit owns its config section: each method its `method:` schema (memray.methods), the
attacks their `attacks:` entries (`memray.attacks.AttackConfig`), the datasets the
`data:` section (`memray.data.DataConfig`), the model catalogue the `model:` section
(`memray.catalogue.ModelConfig`). This module sits above them and puts the trial schema
together (the `method` union from the method registry), with the sections no unit owns
(train, eval, extraction, the reference-model section, resources, W&B), trial ids that stay
stable as keys and attacks are added, and the W&B mode. Reading the files a user writes
(YAML, `key=value` overrides, grid cells) is `memray.files`; every error is a
`ConfigError` naming the file and the dotted field.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from memray.attacks import ATTACK_OPTIONS, AttackConfig, attack_rules, default_attacks
from memray.attacks import ATTACKS as ATTACK_REGISTRY
from memray.catalogue import (APPROX_PARAMS, BUILTIN_MODELS, GPU_TYPES, MODEL_ALIASES, UNKNOWN_PARAMS,
                              ModelConfig)
from memray.data import CanaryConfig, DataConfig, DuplicatesConfig, dataset_names, default_dataset
from memray.methods import METHODS as METHOD_REGISTRY, default_method, dp_gradients
from memray.reference_attacks import MIN_REFERENCES, reference_seed
from memray.schema import ConfigError, Schema

#: Membership-inference attacks, from the `attacks` registry (registration order).
ATTACKS: tuple[str, ...] = ATTACK_REGISTRY.names()
#: Attacks of a trial whose config has no `attacks` list (those registered with
#: `default=True`): an attack registered later is run only where a config lists it, so
#: existing configs keep their trial ids (and `memray resume` does not re-run finished trials).
DEFAULT_ATTACKS: tuple[str, ...] = default_attacks()

#: Fine-tuning methods, from the `methods` registry (one module of memray/methods each).
METHODS: tuple[str, ...] = METHOD_REGISTRY.names()



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


class DPConfig(Schema):
    """DP-SGD (Abadi et al. 2016, arXiv 1607.00133), memray.dp: each step draws a Poisson
    sample of the training texts (each with probability batch_size / texts, so batch_size is
    the expected batch), clips each text's gradient to `clip`, adds Gaussian noise of
    std noise_multiplier x clip to their sum. The noise multiplier is calibrated so that the
    accountant's epsilon after the last epoch is `epsilon` (memray.dp.calibrate)."""

    epsilon: float = Field(gt=0)  # target epsilon, spent exactly by the end of the last epoch
    # None: 1 / (10 x training texts). delta must be well below 1/N: a mechanism that publishes
    # one random record in full is (0, 1/N)-DP; one tenth of that is the usual margin
    delta: float | None = Field(None, gt=0, lt=1)
    clip: float = Field(1.0, gt=0)  # per-sample gradient norm bound (L2 over all trained weights)
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's accountant: Renyi DP (Mironov 2017) or PRV (Gopi et al. 2021)


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
    # DP-SGD (None: none). Under it the batches are Poisson samples (group_by_length does not
    # apply), the loss is the per-text mean (chunked_loss does not apply), max_grad_norm gives way
    # to dp.clip, and grad_accum and compile are refused; so are multi-worker (ZeRO) trials
    dp: DPConfig | None = None


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
    ("train", "deepspeed"): None, ("data", "revision"): None, ("train", "dp"): None,
    ("data", "overlap_filter"): None,
}  # a method's own keys added later: its config section's `added_later`
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
    method: MethodConfig = Field(default_factory=lambda: METHOD_REGISTRY[default_method()].config())
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
            sharing = " and ".join(name for name in ATTACK_REGISTRY if ATTACK_REGISTRY[name].needs_reference_models)
            raise ValueError(f"{sharing} share their reference models: give them the same references, "
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
    def _dp_can_be_private(self) -> "TrialConfig":
        """train.dp with what DP-SGD cannot make private (or would account wrongly) is refused,
        the setting named, before any model loads."""
        train = self.train
        if train.dp is None:
            return self
        refuse = METHOD_REGISTRY[self.method.name].dp_refusal
        refusal = refuse(self.method) if refuse is not None else None
        if refusal is not None:
            raise ValueError(f"train.dp: method {self.method.name} is refused under DP-SGD: {refusal}")
        dp_gradients(self.method)  # a unit naming an engine memray lacks: told here, before any model loads
        if train.grad_accum != 1:
            raise ValueError(f"train.dp: train.grad_accum {train.grad_accum} is refused under DP-SGD: a Poisson-sampled "
                             "batch is one noisy step (raise train.batch_size, the expected batch, instead)")
        if train.compile:
            raise ValueError("train.dp: train.compile is refused under DP-SGD: the per-sample gradients (Opacus's "
                             "hooks, torch.func's vmap) are not traced by torch.compile")
        if train.deepspeed is not None:
            raise ValueError("train.dp: train.deepspeed is refused under DP-SGD: per-sample clipping does not run "
                             "under DeepSpeed ZeRO (which partitions the gradients it clips per sample)")
        return self

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
            return {"name": default_method(), **method}  # the default method, as when `method` is absent
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
        # (and the rules of an attack's own, recall's, dcpdd's, ...: only where it is listed)
        payload["attack_rules"] = attack_rules(self.attacks)
        if payload["reference"] is None:
            del payload["reference"]  # targets and plain trials: ids as before the section existed
        else:  # how a reference is trained from its target's data: a change of it is a new reference
            payload["reference_recipe"] = REFERENCE_RECIPE
        for attack in payload["attacks"]:
            for option in ("references", *ATTACK_OPTIONS):
                if attack.get(option) is None:
                    attack.pop(option, None)  # attacks that do not take it: ids as before the key existed
        added = [*ADDED_LATER.items(), *((("method", key), default) for key, default
                                         in METHOD_REGISTRY[self.method.name].config.added_later.items())]
        for (section, key), default in added:
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
        if self.train.dp is not None:  # DP-SGD: its target epsilon
            parts.insert(-2, f"dp{self.train.dp.epsilon:g}")
        if self.reference is not None:  # a reference model of lira / rmia
            parts.insert(-1, f"ref{self.reference.index}")
        return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


class Cell(Schema):
    """One grid cell of a sweep: its index, its axis values, and its resolved trial config
    (`memray.files.expand_grid`). Defined here, beside the trial schema: sweep folders hold
    it pickled (Ray Tune's experiment state) as `memray.config.Cell`."""

    index: int
    axes: dict[str, Any]
    config: TrialConfig


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


#: What other modules import from here though a unit or the catalogue owns it.
__all__ = ["APPROX_PARAMS", "ATTACKS", "BUILTIN_MODELS", "GPU_TYPES", "METHODS", "MODEL_ALIASES", "UNKNOWN_PARAMS",
           "AttackConfig", "CanaryConfig", "Cell", "ConfigError", "DataConfig", "DeepSpeedConfig", "DuplicatesConfig",
           "EvalConfig", "ExtractionConfig", "MethodConfig", "ModelConfig", "ReferenceConfig", "ResourceRule",
           "Schema", "SimilarityThresholds", "SweepConfig", "TrainConfig", "TrialConfig", "WandbConfig",
           "dataset_names", "default_dataset", "resolve_wandb_mode", "wandb_key_configured"]
