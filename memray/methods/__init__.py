"""Fine-tuning methods: the registry, and applying a method to a model.

Each method is one module of this package holding its config section (a `MethodSchema`
subclass: the keys a user writes under `method:`), the function that applies it, and one
`register(MethodSpec(...))` line with everything memray needs to know of it by name: its
default learning rate, planning cost, family (`METHOD_FAMILIES`: parameter-based or
prompt-based, as the studies group them), FLOP class (`FLOP_CLASSES`), an estimate of its
trained parameters from the model's shape, whether it trains on several workers, how DP-SGD
computes its per-sample gradients (`dp_gradients`: Opacus's layer rules or torch.func over
the whole model) and whether it refuses some configs (`dp_refusal`), and its report label
(`MethodSchema.label`). Nothing outside the unit names the method. Every
module here whose name does not start with `_` is imported below, so a new method is a new
file: the trial schema (`memray.config`), the sweep's planning, `memray bench` and the CLI
take their lists from `METHODS`. PEFT does the work where it can.

`apply_method(model, method)` freezes what the method does not train, wraps the model
(PEFT methods) and returns it with a `MethodInfo`: what is trained (in words), parameter
counts, whether checkpoints hold adapter weights only, how many virtual positions the
method prepends to the input, and the learning rate. `check_method` is the pre-flight
version: it builds the model's skeleton on the meta device (no weights, no memory) and
raises a `ConfigError` if, e.g., a LoRA placement matches no module of the model.

This package imports neither torch nor PEFT at import time (the config is validated before
anything heavy loads); each unit imports them inside its functions.

Checked with peft 0.21 and transformers 5.23 on GPT-2 and Llama layouts: every method
trains, and greedy `generate` with the KV cache equals step-by-step decoding without it.
Prefix tuning hands its prefix to the model as a KV cache (PEFT follows the cache classes
of transformers >= 4.56 since huggingface/peft#2662, #2737), so it cannot be combined with
gradient checkpointing (huggingface/peft#869): memray does not enable it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from pydantic import Field

from memray.registry import Registry, load_entry_points
from memray.schema import ConfigError, Schema

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


class MethodSchema(Schema):
    """Base of every method's config section; `name` (a Literal of the method's name) is the
    discriminator of the trial schema's `method` union."""

    lr: float | None = Field(None, gt=0)  # None: the method's default learning rate

    #: Keys of this section that the method's report label (`label`) already shows, so the
    #: report does not repeat them beside it.
    label_keys: ClassVar[tuple[str, ...]] = ()
    #: (category key, numeric key) the report compares the method's variants by in a table
    #: and figure of their own (LoRA: placement and rank), with their title; None: no such table.
    report_axes: ClassVar[tuple[str, str] | None] = None
    report_title: ClassVar[str] = ""
    #: Keys added to the section after trials were run with it, and their defaults: a trial
    #: that leaves one at its default keeps the id (and folder) it had before the key existed.
    added_later: ClassVar[dict[str, Any]] = {}
    #: Settings of this section that make a variant known under a name of its own (LoRA's
    #: `dora`), which `memray bench` measures beside the defaults.
    bench_variants: ClassVar[tuple[dict[str, Any], ...]] = ()

    def slug(self) -> str:
        """The method's part of a trial's folder name: its name, plus main knobs where a
        method has them."""
        return self.name  # type: ignore[attr-defined]

    def label(self) -> str:
        """The method as tables and legends name it (`lora (attn, r8)`); default: its name."""
        return self.name  # type: ignore[attr-defined]

    def report_point(self) -> tuple[str, float] | None:
        """(category, number) of this variant on `report_axes`, or None where it is not
        compared there (a LoRA with custom target modules has no placement)."""
        return None


class Shape(Protocol):
    """What a planning estimate knows of a model (`memray.distributed.ModelShape`)."""

    params: int
    hidden: int
    layers: int
    vocab: int


#: f(model, method config, source) -> (model to train, what is trained in words, virtual tokens)
Apply = Callable[["PreTrainedModel", Any, str], "tuple[torch.nn.Module, str, int]"]
#: f(model skeleton on the meta device, method config, source): raise ConfigError if it does not fit
Check = Callable[["torch.nn.Module", Any, str], None]
#: f(model shape, method config) -> about how many parameters the method trains (planning:
#: GPU memory and FLOPs before any model loads; `apply` counts the real number)
EstimateTrainable = Callable[[Shape, Any], float]

#: How a trained token's FLOPs are counted (`memray.flops.train_flops_per_token`), by where
#: the backward pass goes: each method's registry entry names its class.
FLOP_CLASSES = {
    "all-weights": "every weight gets a gradient: 6N per token",
    "output-layer": "the backward stops at the output layer: 2N, plus 2x the output layer",
    "frozen-body": "activation gradients through a frozen body: 4N, plus 2x the trained parameters",
}


@dataclass(frozen=True)
class MethodSpec:
    """What memray knows of a method; one per module of this package."""

    name: str
    config: type[MethodSchema]  # its `method:` section
    apply: Apply
    default_lr: float  # AdamW learning rate when method.lr is unset (the unit's docstring says why)
    # cost of one training pass over a token, in forward passes of the whole model: 3 when
    # every weight gets a gradient (forward + backward for activations and weights), less
    # when the backward stops early or skips weight gradients; the sweep orders trials by it
    train_pass_cost: float
    peft: bool  # True: checkpoints hold adapter weights only
    family: str  # one of METHOD_FAMILIES: the report colours and groups methods by it
    flop_class: str  # one of FLOP_CLASSES
    estimate_trainable: EstimateTrainable  # trained parameters, from the model's shape
    check: Check | None = None  # pre-flight on the model's skeleton; None: fits every causal LM
    # trains under DeepSpeed ZeRO on several workers (a resource rule's `workers` > 1)
    multi_worker: bool = False
    # DP-SGD (train.dp): f(method config) -> the engine of its per-sample gradients, one of
    # DP_GRADIENT_ENGINES: "opacus" (Opacus's layer rules) only where every trained weight sits
    # in a layer that runs once per text on that text's own activations, else "torch.func"
    # (the whole model traced one text at a time: right whatever the method's forward does,
    # the default). tests/test_privacy.py checks both against a hand-written step, per method.
    dp_gradients: "Callable[[Any], str]" = lambda method: "torch.func"
    # f(method config) -> None where DP-SGD can train that config, else why it is refused
    # (in validation, exit 2); None: accepted throughout
    dp_refusal: "Callable[[Any], str | None] | None" = None


METHODS: Registry[MethodSpec] = Registry("method")
@dataclass(frozen=True)
class DPGradientEngine:
    """A per-sample gradient engine of DP-SGD, as planning knows it (memray.dp runs it)."""

    description: str
    # the backward pass's activation memory against a plain one, for the dry run's estimate:
    # `memray bench --sections dp` on SmolLM2-135M (8 x 64 tokens, CPU) measured Opacus at
    # 1.02x the plain pass's peak and torch.func at 1.3-2.0x
    activation_memory: float


#: DP-SGD's per-sample gradient engines by name (`MethodSpec.dp_gradients`)
DP_GRADIENT_ENGINES = {
    "opacus": DPGradientEngine("Opacus's GradSampleModule: a rule per layer, one batched backward pass", 1.0),
    "torch.func": DPGradientEngine("torch.func: grad of each text's loss through the whole model, vmapped over "
                                   "the texts", 2.0),
}
#: The families of methods the studies compare (Hou et al. 2025), key -> title: parameter-based methods change
#: or add weights inside the model (full, head, LoRA, (IA)^3), prompt-based methods train
#: inputs prepended to every sequence (prefix, prompt and P-tuning), the model untouched.
METHOD_FAMILIES = {"parameter-based": "parameter-based", "prompt-based": "prompt-based"}


def register(spec: MethodSpec, default: bool = False) -> MethodSpec:
    """Add a method (`default`: the method of a config without a `method` section); ValueError
    if its name is taken, its schema's `name` differs, its family or FLOP class is unknown,
    or a second method claims to be the default."""
    declared = spec.config.model_fields["name"].default
    if declared != spec.name:
        raise ValueError(f"method {spec.name!r}: its config's name defaults to {declared!r}")
    if spec.family not in METHOD_FAMILIES:
        raise ValueError(f"method {spec.name!r}: family {spec.family!r} is not one of {', '.join(METHOD_FAMILIES)}")
    if spec.flop_class not in FLOP_CLASSES:
        raise ValueError(f"method {spec.name!r}: FLOP class {spec.flop_class!r} is not one of {', '.join(FLOP_CLASSES)}")
    return METHODS.add(spec.name, spec, default=default)


def dp_gradients(method: Any) -> str:
    """The per-sample gradient engine DP-SGD uses for this method config (a key of
    DP_GRADIENT_ENGINES); ValueError naming the method if its unit names another."""
    engine = METHODS[method.name].dp_gradients(method)
    if engine not in DP_GRADIENT_ENGINES:
        raise ValueError(f"method {method.name!r}: its per-sample gradient engine {engine!r} is not one of "
                         f"{', '.join(DP_GRADIENT_ENGINES)}")
    return engine


def default_method() -> str:
    """The name of the method a config without a `method` section gets."""
    return METHODS.default


def method_label(method: dict[str, Any]) -> str:
    """The report's label of a method section as result.json holds it (`lora (attn, r8)`);
    its name where the method is no longer registered or the section no longer validates."""
    name = str(method.get("name", "?"))
    if name not in METHODS:
        return name
    try:
        return METHODS[name].config.model_validate(method).label()
    except ValueError:
        return name


@dataclass
class MethodInfo:
    name: str
    trainable_params: int
    total_params: int
    trained: str  # what is trained, in words
    peft: bool  # True: checkpoints hold adapter weights only
    virtual_tokens: int  # positions prepended to the input (prompt / ptuning); prefix adds keys/values, not positions
    lr: float  # method.lr, or the method's default


def default_lr(method: MethodSchema) -> float:
    """method.lr, or the method's default learning rate."""
    return method.lr if method.lr is not None else METHODS[method.name].default_lr  # type: ignore[attr-defined]


def apply_method(model: "PreTrainedModel", method: MethodSchema, source: str = "config") -> "tuple[torch.nn.Module, MethodInfo]":
    """Make `model` train only what `method` trains.

    Returns (the model to train: `model` itself or its PEFT wrapper, its MethodInfo).
    Raises ConfigError (naming `source` and the method field) if the method does not fit
    the model, e.g. a LoRA placement that matches none of its modules.
    """
    spec = METHODS[method.name]  # type: ignore[attr-defined]
    wrapped, trained, virtual_tokens = spec.apply(model, method, source)
    parameters = list(wrapped.parameters())  # each shared (tied) tensor once
    info = MethodInfo(name=spec.name,
                      trainable_params=sum(p.numel() for p in parameters if p.requires_grad),
                      total_params=sum(p.numel() for p in parameters), trained=trained,
                      peft=spec.peft, virtual_tokens=virtual_tokens, lr=default_lr(method))
    return wrapped, info


def check_method(model_config: "PretrainedConfig | PreTrainedModel", method: MethodSchema, source: str = "config") -> None:
    """Pre-flight without weights: raise ConfigError if `method` does not fit the model
    (e.g. a LoRA placement matching no adaptable module, no output layer for head)."""
    check = METHODS[method.name].check  # type: ignore[attr-defined]
    if check is None:
        return
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(model_config, PreTrainedModel):
        skeleton = model_config
    else:
        with torch.device("meta"):  # the module tree only: no memory, no init cost
            skeleton = AutoModelForCausalLM.from_config(model_config)
    check(skeleton, method, source)


def _import_units() -> None:
    """Import every method module of this package (each registers itself), in name order,
    then those installed packages name as `memray.methods` entry points."""
    for unit in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not unit.name.startswith("_"):
            importlib.import_module(f"{__name__}.{unit.name}")
    load_entry_points("memray.methods")


_import_units()

__all__ = ["FLOP_CLASSES", "METHODS", "METHOD_FAMILIES", "ConfigError", "MethodInfo", "MethodSchema", "MethodSpec",
           "Shape", "apply_method", "check_method", "default_lr", "default_method", "method_label", "register"]
