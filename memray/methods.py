"""Fine-tuning methods: one small registered unit each; PEFT does the work where it can.

`apply_method(model, method)` freezes what the method does not train, wraps the model
(PEFT methods) and returns it with a `MethodInfo`: what is trained (in words), parameter
counts, whether checkpoints hold adapter weights only, how many virtual positions the
method prepends to the input, and the learning rate. `check_method` is the pre-flight
version: it builds the model's skeleton on the meta device (no weights, no memory) and
raises a `ConfigError` if, e.g., a LoRA placement matches no module of the model.

Each method is a function registered with `@register(name)` in `REGISTRY`; it gets the
model and its config section and returns (model to train, what is trained, virtual tokens).

Checked with peft 0.21 and transformers 5.23 on GPT-2 and Llama layouts: every method
trains, and greedy `generate` with the KV cache equals step-by-step decoding without it.
Prefix tuning hands its prefix to the model as a KV cache (PEFT follows the cache classes
of transformers >= 4.56 since huggingface/peft#2662, #2737), so it cannot be combined with
gradient checkpointing (huggingface/peft#869): memray does not enable it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from memray.config import ConfigError, MethodConfig

#: Learning rates (AdamW) that work for the study models, GPT-2 124M-1.5B and Llama 1B-7B.
#: Full fine-tuning moves every pretrained weight, so it takes the usual small step for
#: fine-tuning (5e-5). Head-only trains one pretrained matrix and can take a larger one.
#: LoRA's B starts at zero and its update is scaled by alpha/r: 2e-4 is the rate Hu et al.
#: 2021 (arXiv 2106.09685) used for GPT-2. Prefixes and soft prompts are a few thousand
#: fresh parameters that must travel far from their init, so they take the largest steps
#: (PEFT's soft-prompt guides use up to 3e-2; memray stays lower because a trial runs many
#: epochs and the raw prefix without its MLP is known to be unstable, Li & Liang 2021).
DEFAULT_LR: dict[str, float] = {
    "full": 5e-5,
    "head": 1e-4,
    "lora": 2e-4,
    "prefix": 1e-3,
    "prompt": 3e-3,
    "ptuning": 1e-3,
}

#: LoRA placement -> module-name suffixes, per model family (config.model_type). GPT-2 has
#: a `c_proj` in both its attention and its MLP block, so its suffixes name the block.
_LLAMA_LIKE = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
LORA_MODULES: dict[str, dict[str, list[str]]] = {
    "gpt2": {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "olmo2": _LLAMA_LIKE,
    "gpt_neox": {"attn": ["attention.query_key_value", "attention.dense"],
                 "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]},
    "opt": {"attn": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    "phi3": {"attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
}
#: Module types LoRA can adapt (GPT-2's linear layers are transformers' Conv1D).
_LORA_ADAPTABLE = (torch.nn.Linear, Conv1D, torch.nn.Embedding)

#: Prompt tuning's text init when method.init_text is not set: neutral, no task in it.
DEFAULT_INIT_TEXT = "Continue the following text:"


@dataclass
class MethodInfo:
    name: str
    trainable_params: int
    total_params: int
    trained: str  # what is trained, in words
    peft: bool  # True: checkpoints hold adapter weights only
    virtual_tokens: int  # positions prepended to the input (prompt / ptuning); prefix adds keys/values, not positions
    lr: float  # method.lr, or the method's default


Unit = Callable[[PreTrainedModel, MethodConfig, str], tuple[torch.nn.Module, str, int]]
REGISTRY: dict[str, Unit] = {}


def register(name: str) -> Callable[[Unit], Unit]:
    """Register a method unit: f(model, method config, source) -> (model, trained, virtual tokens)."""

    def add(unit: Unit) -> Unit:
        REGISTRY[name] = unit
        return unit

    return add


def apply_method(model: PreTrainedModel, method: MethodConfig, source: str = "config") -> tuple[torch.nn.Module, MethodInfo]:
    """Make `model` train only what `method` trains.

    Returns (the model to train: `model` itself or its PEFT wrapper, its MethodInfo).
    Raises ConfigError (naming `source` and the method field) if the method does not fit
    the model, e.g. a LoRA placement that matches none of its modules.
    """
    wrapped, trained, virtual_tokens = REGISTRY[method.name](model, method, source)
    parameters = list(wrapped.parameters())  # each shared (tied) tensor once
    info = MethodInfo(name=method.name,
                      trainable_params=sum(p.numel() for p in parameters if p.requires_grad),
                      total_params=sum(p.numel() for p in parameters), trained=trained,
                      peft=method.name not in ("full", "head"), virtual_tokens=virtual_tokens,
                      lr=method.lr if method.lr is not None else DEFAULT_LR[method.name])
    return wrapped, info


def check_method(model_config: PretrainedConfig | PreTrainedModel, method: MethodConfig, source: str = "config") -> None:
    """Pre-flight without weights: raise ConfigError if `method` does not fit the model
    (LoRA placement / target_modules matching no adaptable module, no output layer for head)."""
    if method.name not in ("lora", "head"):
        return
    if isinstance(model_config, PreTrainedModel):
        skeleton = model_config
    else:
        with torch.device("meta"):  # the module tree only: no memory, no init cost
            skeleton = AutoModelForCausalLM.from_config(model_config)
    if method.name == "lora":
        lora_targets(skeleton, method, source)
    elif skeleton.get_output_embeddings() is None:
        raise ConfigError(source, "method.name", f"head: {type(skeleton).__name__} has no output layer to train")


def lora_targets(model: torch.nn.Module, method: MethodConfig, source: str = "config") -> list[str]:
    """Module-name suffixes LoRA attaches to: method.target_modules, or method.placement
    mapped for the model's family. ConfigError if one of them matches no adaptable module."""
    adaptable = {name: module for name, module in model.named_modules() if isinstance(module, _LORA_ADAPTABLE)}
    family = getattr(getattr(model, "config", None), "model_type", None)
    have = f"its linear layers: {', '.join(_suffixes(adaptable))}"
    if method.target_modules:
        targets, field = list(method.target_modules), "method.target_modules"
    elif family in LORA_MODULES:
        parts = ["attn", "mlp"] if method.placement == "both" else [method.placement]
        targets, field = [suffix for part in parts for suffix in LORA_MODULES[family][part]], "method.placement"
    else:
        raise ConfigError(source, "method.placement",
                          f"no LoRA placement is known for model type {family!r}; set method.target_modules ({have})")
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in adaptable)]
    if missing:
        what = f"placement {method.placement!r} -> {', '.join(targets)}: " if field == "method.placement" else ""
        raise ConfigError(source, field, f"{what}{', '.join(missing)} match{'es' if len(missing) == 1 else ''} "
                                         f"no linear layer of this {family or 'model'} model ({have})")
    return targets


def _suffixes(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Distinct 'block.leaf' names without layer numbers, e.g. attn.c_attn, mlp.c_fc."""
    return sorted({".".join(p for p in name.split(".")[-2:] if not p.isdigit()) for name in modules})


def _peft(model: PreTrainedModel, config: PeftConfig, source: str, field: str) -> torch.nn.Module:
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise ConfigError(source, field, f"PEFT cannot apply this method to {type(model).__name__}: {err}") from None


@register("full")
def _full(model: PreTrainedModel, method: MethodConfig, source: str) -> tuple[torch.nn.Module, str, int]:
    model.requires_grad_(True)
    return model, "all weights", 0


@register("head")
def _head(model: PreTrainedModel, method: MethodConfig, source: str) -> tuple[torch.nn.Module, str, int]:
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(source, "method.name", f"head: {type(model).__name__} has no output layer to train")
    model.requires_grad_(False)
    tied = head.weight is model.get_input_embeddings().weight
    if tied and method.untie:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        # so that save / load (and any later tie_weights) keep the two matrices apart
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
        trained = "the output layer (lm_head), untied from the input embeddings: a trained copy, embeddings frozen"
    elif tied:
        trained = "the output layer (lm_head), tied to the input embeddings: the shared matrix is trained"
    else:
        trained = "the output layer (lm_head)"
    head.requires_grad_(True)
    return model, trained, 0


@register("lora")
def _lora(model: PreTrainedModel, method: MethodConfig, source: str) -> tuple[torch.nn.Module, str, int]:
    targets = lora_targets(model, method, source)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=method.rank, lora_alpha=method.alpha,
                        lora_dropout=method.dropout, target_modules=targets,
                        fan_in_fan_out=model.config.model_type == "gpt2")  # Conv1D stores weights transposed
    wrapped = _peft(model, config, source, "method.target_modules" if method.target_modules else "method.placement")
    adapted = sum(isinstance(module, LoraLayer) for module in wrapped.modules())
    return wrapped, f"LoRA r={method.rank} alpha={method.alpha:g} on {', '.join(targets)} ({adapted} modules)", 0


@register("prefix")
def _prefix(model: PreTrainedModel, method: MethodConfig, source: str) -> tuple[torch.nn.Module, str, int]:
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.virtual_tokens,
                                prefix_projection=method.projection)
    how = ", produced by an MLP" if method.projection else ""
    trained = f"a {method.virtual_tokens}-position prefix of keys and values in every layer{how}"
    return _peft(model, config, source, "method.name"), trained, 0


@register("prompt")
def _prompt(model: PreTrainedModel, method: MethodConfig, source: str) -> tuple[torch.nn.Module, str, int]:
    if method.init == "text":
        # PEFT tokenizes the text with the model's tokenizer and copies those token embeddings;
        # models.load_model sets name_or_path to where the tokenizer loads from (built-ins too).
        tokenizer = model.config.name_or_path
        if not tokenizer:
            raise ConfigError(source, "method.init", "init 'text' needs the model's tokenizer, but the model "
                                                     "does not say where it was loaded from (config.name_or_path)")
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.TEXT, tokenizer_name_or_path=tokenizer,
                                    prompt_tuning_init_text=method.init_text or DEFAULT_INIT_TEXT)
    else:
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
    trained = f"a {method.virtual_tokens}-token soft prompt ({method.init} init)"
    return _peft(model, config, source, "method.init"), trained, method.virtual_tokens


@register("ptuning")
def _ptuning(model: PreTrainedModel, method: MethodConfig, source: str) -> tuple[torch.nn.Module, str, int]:
    encoder = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
    hidden = method.encoder_hidden or model.config.get_text_config().hidden_size
    config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.virtual_tokens,
                                 encoder_reparameterization_type=encoder[method.encoder], encoder_hidden_size=hidden)
    trained = f"a {method.virtual_tokens}-token prompt produced by an {method.encoder.upper()} encoder (hidden {hidden})"
    return _peft(model, config, source, "method.encoder"), trained, method.virtual_tokens
