"""Planning a sweep, without Ray: validating every cell (models, methods, resource rules),
each trial's resources (by rule, or a default by model size and method), the GPU memory a
trial needs, the order trials start in (longest first, by the methods' planning costs) and
the concurrency cap that keeps multi-worker trials from waiting on each other.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from memray.config import APPROX_PARAMS, UNKNOWN_PARAMS, Cell, ConfigError, ResourceRule, SweepConfig, TrialConfig
from memray.files import load_sweep, parse_override
from memray.attacks import ATTACKS
from memray.data import planned_members
from memray.gguf_bases import is_gguf
from memray.methods import DP_GRADIENT_ENGINES, METHODS, dp_gradients


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`key=value` strings (or a mapping already parsed) -> {dotted key: value}."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides)


def approx_params(config: TrialConfig) -> float:
    """Approximate parameter count of the trial's model: a GGUF file's count from its tensor
    table, an alias's from APPROX_PARAMS, UNKNOWN_PARAMS for other models."""
    if is_gguf(config.model.name):
        from memray import models

        return float(models.gguf_parameter_count(config.model))
    return APPROX_PARAMS.get(config.model.name, UNKNOWN_PARAMS)


def default_resources(config: TrialConfig, has_gpus: bool) -> ResourceRule:
    """Resources for a trial no rule matches: CPU-only without GPUs; with GPUs, a share of
    one GPU by model size (full fine-tuning needs about twice a PEFT method's memory:
    gradients and AdamW states for every weight), a whole GPU from ~1B parameters on."""
    if not has_gpus:
        return ResourceRule(cpus=1)  # one thread per trial: N trials on N cores beat one trial on N
    params, full = approx_params(config), METHODS[config.method.name].flop_class == "all-weights"
    if params <= 200e6:
        gpus = 0.5 if full else 0.25  # e.g. four GPT-2 124M LoRA trials per GPU
    elif params <= 800e6:
        gpus = 1.0 if full else 0.5
    else:
        gpus = 1.0
    return ResourceRule(cpus=max(1.0, 4 * gpus), gpus=gpus)  # a few CPUs per GPU for data and eval


def _lookup(tree: Any, key: str) -> tuple[bool, Any]:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _matches(wanted: Any, value: Any) -> bool:
    if isinstance(wanted, list):
        return any(_matches(w, value) for w in wanted)
    if isinstance(wanted, dict):
        return isinstance(value, dict) and all(k in value and _matches(v, value[k]) for k, v in wanted.items())
    return wanted == value


def rule_matches(rule: ResourceRule, config: TrialConfig) -> bool:
    """Whether every `match` key of the rule has one of the accepted values in the config."""
    resolved = config.resolved()
    for key, wanted in rule.match.items():
        found, value = _lookup(resolved, key)
        if not found or not _matches(wanted, value):
            return False
    return True


def check_rules(rules: list[ResourceRule], cells: list[Cell], source: str) -> None:
    """Every `match` key must exist in some cell's config and every value must occur in
    some cell; else a ConfigError naming `resources.<i>.match.<key>`."""
    resolved = [cell.config.resolved() for cell in cells]
    for index, rule in enumerate(rules):
        for key, wanted in rule.match.items():
            field_name = f"resources.{index}.match.{key}"
            values = [value for found, value in (_lookup(tree, key) for tree in resolved) if found]
            if not values:
                raise ConfigError(source, field_name, "unknown field: no trial of this sweep has it")
            for option in wanted if isinstance(wanted, list) else [wanted]:
                if not any(_matches(option, value) for value in values):
                    seen = sorted({json.dumps(v, sort_keys=True) for v in values})
                    raise ConfigError(source, field_name, f"no trial has {json.dumps(option)} "
                                                          f"(the sweep has {', '.join(seen[:8])})")
    for cell in cells:
        index, rule = next(((i, r) for i, r in enumerate(rules) if rule_matches(r, cell.config)), (None, None))
        workers = rule.workers if rule else 1
        if workers > 1 and cell.config.train.dp is not None:
            raise ConfigError(source, f"resources.{index}.workers",
                              f"grid cell {cell.index} sets train.dp: DP-SGD runs in one process (per-sample "
                              "clipping does not run under DeepSpeed ZeRO, which multi-worker trials use); give it "
                              "workers: 1")
        if workers > 1 and not METHODS[cell.config.method.name].multi_worker:
            able = ", ".join(name for name in METHODS if METHODS[name].multi_worker)
            raise ConfigError(source, f"resources.{index}.workers",
                              f"grid cell {cell.index} uses method {cell.config.method.name}: multi-worker trials "
                              f"(DeepSpeed ZeRO) need a method that trains on several workers; match only "
                              f"method.name: {able}")


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for, and where the numbers came from."""

    rule: ResourceRule
    source: str  # "resources.<i>" or "default"

    def bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles Tune reserves for the trial before it starts. A
        multi-worker trial reserves only its own process: Ray Train requests its workers."""
        head = {"CPU": self.rule.cpus}
        if self.rule.workers == 1 and self.rule.gpus:
            head.update(gpu_resources(self.rule, self.rule.gpus))
        return [head]

    def total(self) -> dict[str, float]:
        """Everything the trial holds while it runs, workers included."""
        rule = self.rule
        if rule.workers == 1:
            return {"CPU": rule.cpus, "GPU": rule.gpus, **gpu_resources(rule, rule.gpus)}
        return {"CPU": rule.cpus + rule.workers * rule.cpus_per_worker,
                **gpu_resources(rule, float(rule.workers * rule.gpus_per_worker))}

    def describe(self) -> str:
        rule = self.rule
        text = f"cpus={rule.cpus:g} gpus={rule.gpus:g}"
        if rule.workers > 1:
            text = (f"cpus={rule.cpus:g} + {rule.workers} workers x (cpus={rule.cpus_per_worker:g} "
                    f"gpus={rule.gpus_per_worker})")
        if rule.gpu_type:
            text += f" on {rule.gpu_type}"
        return f"{text} [{self.source}]"


def gpu_resources(rule: ResourceRule, gpus: float) -> dict[str, float]:
    """Ray resources for `gpus` GPUs under the rule: GPU, and as much of its gpu_type's custom
    resource (one per GPU of a node of that type), which binds the trial to such nodes."""
    if not gpus:
        return {}
    return {"GPU": gpus, **({rule.gpu_type: gpus} if rule.gpu_type else {})}


def memory_estimate(config: TrialConfig, rule: ResourceRule, shape: Any) -> Any:
    """GPU memory per worker of a trial under `rule` (memray.distributed.estimate_memory):
    ZeRO by train.deepspeed (or its default for the size) when the rule has workers > 1;
    bf16 where the trial has GPUs and train.precision allows it. PEFT methods train few
    weights: as many as the method's registry entry estimates from the model's shape."""
    from memray.distributed import estimate_memory, resolve_zero

    trainable = METHODS[config.method.name].estimate_trainable(shape, config.method)
    on_gpu = rule.gpus_per_worker > 0 if rule.workers > 1 else rule.gpus > 0
    bf16 = on_gpu and config.train.precision != "fp32"
    stage, zero = 0, None
    if rule.workers > 1:
        zero = resolve_zero(config.train.deepspeed, shape.params)
        stage = zero.stage
    return estimate_memory(shape, trainable_params=trainable, workers=rule.workers, stage=stage,
                           offload_optimizer=bool(zero and zero.offload_optimizer),
                           offload_params=bool(zero and zero.offload_params), batch_size=config.train.batch_size,
                           seq_len=config.data.max_length, bf16=bf16,
                           activation_checkpointing=bool(zero and zero.activation_checkpointing),
                           # DP-SGD keeps a gradient per text of a chunk of batch_size texts
                           per_sample_gradients=config.train.batch_size if config.train.dp else 0,
                           activation_factor=(DP_GRADIENT_ENGINES[dp_gradients(config.method)].activation_memory
                                              if config.train.dp else 1.0))


def gpu_budget_gb(rule: ResourceRule) -> float | None:
    """GPU memory one worker of the rule may use: its share of one GPU; None without GPUs."""
    share = rule.gpus_per_worker if rule.workers > 1 else min(rule.gpus, 1.0)
    return rule.gpu_memory * min(share, 1.0) if share else None


def trial_resources(config: TrialConfig, rules: list[ResourceRule], has_gpus: bool) -> TrialResources:
    """The first matching rule, else the default for the model size and method."""
    for index, rule in enumerate(rules):
        if rule_matches(rule, config):
            return TrialResources(rule, f"resources.{index}")
    return TrialResources(default_resources(config, has_gpus), "default")


def fits(needs: Sequence[Mapping[str, float]], capacity: Mapping[str, float]) -> bool:
    keys = {key for need in needs for key in need}
    return all(sum(need.get(key, 0.0) for need in needs) <= capacity.get(key, 0.0) + 1e-9 for key in keys)


def max_concurrent_trials(resources: Sequence[TrialResources], capacity: Mapping[str, float]) -> int | None:
    """A cap on running trials so that none waits forever for another's resources.

    A single-process trial reserves everything it uses in its placement group before it
    starts, so Tune packs such trials without deadlock and needs no cap (None). A
    multi-worker trial reserves only its own process and Ray Train requests the workers
    afterwards: trials that started could hold the CPUs their workers wait for. The cap is
    then the largest n for which the n hungriest trials, workers included, fit together.
    """
    if all(r.rule.workers == 1 for r in resources):
        return None
    needs = sorted((r.total() for r in resources), key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), reverse=True)
    count = 0
    while count < len(needs) and fits(needs[: count + 1], capacity):
        count += 1
    return max(count, 1)


def trial_cost(config: TrialConfig) -> float:
    """Relative run time: parameters x tokens through the model over the whole trial,
    training passes weighted by the method's `train_pass_cost`; the per-epoch evaluation scores members,
    non-members and the validation set once each (epoch 0 included). A reference model of
    lira / rmia is a trial of its own (its half of the audit pool, about the target's
    members, and the whole pool scored every epoch: about a target's cost)."""
    members = planned_members(config.data)
    train_tokens = members * config.data.max_length * config.train.epochs
    if config.data.duplicates:
        train_tokens *= 1 + config.data.duplicates.fraction * (max(config.data.duplicates.copies) - 1)
    scored = members + (config.data.nonmembers or members) + config.data.validation
    eval_tokens = scored * config.data.max_length * (config.train.epochs + 1)
    one = approx_params(config) * (METHODS[config.method.name].train_pass_cost * train_tokens + eval_tokens)
    return one


def schedule_order(cells: list[Cell]) -> list[int]:
    """Cell indices longest trial first (ties in grid order). Tune creates the trials of
    one `grid_search` in list order and its FIFO scheduler starts pending trials in that
    order, so the longest trials start first and the short ones fill in behind them."""
    return [cell.index for cell in sorted(cells, key=lambda c: (-trial_cost(c.config), c.index))]


#: Model-FLOPs utilization at which the dry run turns FLOPs into GPU-hours: small-batch
#: fine-tuning with fp32 master weights and per-epoch scoring reaches about a quarter of a
#: GPU's dense bf16 peak (memray.flops.PEAK_BF16_TFLOPS); `perf/mfu` measures it per trial.
PLAN_MFU = 0.25


def trial_flops(config: TrialConfig, shape: Any, hf_config: Any) -> float:
    """Model FLOPs of a whole trial, counted as memray.flops counts them (N = the model's
    parameters, the context = data.max_length, an upper bound): every training token of
    every epoch (duplicates included), the forward passes of each evaluation (members and
    non-members up to eval.max_scored, the validation set; before the first epoch and after
    each), the reference model's statistics once, and the greedy decoding of extraction."""
    from memray.flops import attention_flops, train_flops_per_token

    data, epochs = config.data, config.train.epochs
    members = planned_members(data)
    nonmembers = data.nonmembers or members
    copies = 1.0
    if data.duplicates:
        copies += data.duplicates.fraction * (sum(data.duplicates.copies) / len(data.duplicates.copies) - 1)
    head = shape.vocab * shape.hidden
    spec = METHODS[config.method.name]
    context = float(data.max_length)
    train = members * copies * data.max_length * epochs * train_flops_per_token(
        spec.flop_class, shape.params, spec.estimate_trainable(shape, config.method), head, hf_config, context)
    forward = 2 * shape.params + attention_flops(hf_config, context, trained=False)
    cap = config.eval.max_scored or max(members, nonmembers)
    scored = (min(members, cap) + min(nonmembers, cap) + data.validation) * data.max_length * (epochs + 1)
    needs_reference = any(ATTACKS[a.name].needs_reference for a in config.attacks)
    reference = (members + nonmembers) * data.max_length if needs_reference else 0
    decoded = 0.0
    if config.extraction.enabled:
        decoded = 2 * config.extraction.samples * config.extraction.suffix_tokens * (epochs + 1)
    return train + forward * (scored + reference + decoded)


def gpu_hours(flops: float, gpu_type: str) -> float:
    """Hours of one GPU of the type to do `flops` at PLAN_MFU of its dense bf16 peak (a trial
    on a share of a GPU takes longer, on that share: the same GPU-hours)."""
    from memray.config import GPU_TYPES
    from memray.flops import PEAK_BF16_TFLOPS

    name = GPU_TYPES[gpu_type][0]
    peak = next(tflops for keys, tflops in PEAK_BF16_TFLOPS if all(key in name for key in keys))
    return flops / (peak * 1e12 * PLAN_MFU) / 3600


def check_cells(cells: list[Cell], source: str, published: bool = False) -> None:
    """Check each cell's data.path and each distinct model and method of the grid as
    `memray trial` does (names, placements that the model has), before any trial starts.
    published (dry runs): the study aliases are checked against their published shapes,
    not looked up."""
    from memray import data, methods, models

    seen: set[str] = set()
    for cell in cells:
        data.check_data(cell.config.data, f"{source} (grid cell {cell.index})")
        key = json.dumps([cell.config.model.model_dump(mode="json"), cell.config.method.model_dump(mode="json")],
                         sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        where = f"{source} (grid cell {cell.index})"
        methods.check_method(models.model_config(cell.config.model, where, published), cell.config.method, where)


@dataclass
class SweepPlan:
    """A validated sweep with each trial's resources and the Tune settings derived from them."""

    sweep: SweepConfig
    cells: list[Cell]
    source: str
    resources: dict[int, TrialResources]
    order: list[int]
    max_concurrent: int | None
    capacity: dict[str, float]


def plan_sweep(sweep: SweepConfig, cells: list[Cell], source: str, capacity: Mapping[str, float],
               node_capacities: Sequence[Mapping[str, float]], strict: bool) -> SweepPlan:
    """Resources per trial, longest-first order and the concurrency cap. A trial that fits
    on no node is a ConfigError when `strict` (a fixed local Ray), else a warning (an
    autoscaling cluster may still add the node it needs)."""
    has_gpus = capacity.get("GPU", 0.0) > 0
    resources = {cell.index: trial_resources(cell.config, sweep.resources, has_gpus) for cell in cells}
    for cell in cells:
        bundles = resources[cell.index].bundles()
        if not any(fits(bundles, node) for node in node_capacities) or not fits([resources[cell.index].total()], capacity):
            message = (f"grid cell {cell.index} needs {resources[cell.index].describe()}, more than any node "
                       f"of this Ray cluster has ({capacity_text(capacity)} in all)")
            if strict:
                raise ConfigError(source, resources[cell.index].source.replace("default", "resources"), message)
            warnings.warn(message, stacklevel=2)
    return SweepPlan(sweep, cells, source, resources, schedule_order(cells),
                     max_concurrent_trials(list(resources.values()), capacity), dict(capacity))


def capacity_text(capacity: Mapping[str, float]) -> str:
    """`cpus=N gpus=M` of a Ray capacity."""
    return f"cpus={capacity.get('CPU', 0):g} gpus={capacity.get('GPU', 0):g}"


def local_capacity(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray started by memray will have: all cores and the visible GPUs."""
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def load_checked(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None,
          published: bool = False) -> tuple[SweepConfig, list[Cell], dict]:
    """Load a sweep file with overrides and check it whole (resource rules, models, methods):
    (sweep, cells, parsed overrides), or a ConfigError naming the file and the field. The
    cells are every trial of the sweep: the grid's, then the reference models of its lira /
    rmia targets (`memray.references.sweep_cells`)."""
    from memray.references import sweep_cells

    parsed = parse_overrides(overrides)
    sweep, cells = load_sweep(path, parsed)
    cells = sweep_cells(cells)
    check_rules(sweep.resources, cells, str(path))
    check_cells(cells, str(path), published)
    return sweep, cells, parsed


def resolved_sweep_yaml(sweep: SweepConfig, cells: list[Cell], source: str, overrides: dict[str, Any]) -> str:
    """The sweep file as it runs: a valid sweep file whose base has the overrides applied."""
    from memray.files import apply_overrides

    tree = sweep.model_dump(mode="json", exclude_defaults=True)
    tree["name"] = sweep.name
    tree["base"] = apply_overrides(sweep.base, overrides)
    header = f"# resolved from {source}" + (f" with {json.dumps(overrides)}" if overrides else "") + "\n"
    return header + yaml.safe_dump(tree, sort_keys=False)


def axes_text(axes: Mapping[str, Any]) -> str:
    """A cell's axes as `key=value` words, a method mapping as `lora(rank=8,...)`."""
    def value_text(value: Any) -> str:
        if isinstance(value, dict):
            name = value.get("name")
            rest = ",".join(f"{k}={value_text(v)}" for k, v in value.items() if k != "name")
            return f"{name}({rest})" if name is not None else f"({rest})"
        return json.dumps(value) if not isinstance(value, str) else value

    return " ".join(f"{key}={value_text(value)}" for key, value in axes.items())


def model_info(config: TrialConfig, infos: dict[str, Any]) -> tuple[Any, Any]:
    """(shape, transformers config) of the trial's model, parameters counted without
    weights, once per model."""
    from memray import models
    from memray.distributed import ModelShape

    key = json.dumps(config.model.model_dump(mode="json"), sort_keys=True)
    if key not in infos:
        hf_config = models.model_config(config.model, published=True)
        infos[key] = (ModelShape.from_config(hf_config), hf_config)
    return infos[key]
