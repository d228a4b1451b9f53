"""`ia3`: (IA)^3, learned vectors that rescale the attention keys and values and the MLP's
inner activations (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better
and Cheaper than In-Context Learning", arXiv 2205.05638). The fewest trained parameters
of the adapter methods: one vector per adapted layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from memray.methods import MethodSchema, MethodSpec, register
from memray.methods._modules import family, layers_text, peft_model, require_matches
from memray.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: Per model family: (layers whose output, or input for feed-forward ones, is rescaled;
#: the feed-forward ones among them). GPT-2 computes queries, keys and values in one layer,
#: c_attn, so all three are rescaled there; its MLP's inner activation is the input of
#: mlp.c_proj. Llama-like models: keys, values and the input of down_proj. (PEFT's defaults.)
_LLAMA_LIKE = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
IA3_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "olmo2": _LLAMA_LIKE,
}


class Ia3Method(MethodSchema):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = None  # escape hatch: layers rescaled, instead of the family's
    feedforward_modules: list[str] | None = None  # of target_modules, those rescaled at their input

    @model_validator(mode="after")
    def _feedforward_within_targets(self) -> "Ia3Method":
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError("feedforward_modules needs target_modules (it names a subset of them)")
        outside = sorted(set(self.feedforward_modules or []) - set(self.target_modules or []))
        if outside:
            raise ValueError(f"feedforward_modules {', '.join(outside)} must also be in target_modules")
        return self


def modules(model: "torch.nn.Module", method: Ia3Method, source: str = "config") -> tuple[list[str], list[str]]:
    """(target, feed-forward) module-name suffixes for this model; ConfigError naming the
    field if the model's family has no known layout or a name matches no linear layer."""
    if method.target_modules:
        targets, feedforward = list(method.target_modules), list(method.feedforward_modules or [])
        require_matches(model, targets, source, "method.target_modules", embeddings=False)
        return targets, feedforward
    model_type = family(model)
    if model_type not in IA3_MODULES:
        raise ConfigError(source, "method.name", f"ia3: no layout is known for model type {model_type!r}; "
                                                 f"set method.target_modules ({layers_text(model)})")
    targets, feedforward = IA3_MODULES[model_type]
    require_matches(model, targets, source, "method.name", f"ia3 on {model_type}: ", embeddings=False)
    return list(targets), list(feedforward)


def check(model: "torch.nn.Module", method: Ia3Method, source: str) -> None:
    modules(model, method, source)


def apply(model: "PreTrainedModel", method: Ia3Method, source: str) -> "tuple[torch.nn.Module, str, int]":
    from peft import IA3Config, TaskType

    targets, feedforward = modules(model, method, source)
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward,
                       fan_in_fan_out=model.config.model_type == "gpt2")  # Conv1D stores weights transposed
    wrapped = peft_model(model, config, source, "method.target_modules" if method.target_modules else "method.name")
    rescaled = ", ".join(f"{t} ({'input' if t in feedforward else 'output'})" for t in targets)
    return wrapped, f"(IA)^3 scaling vectors on {rescaled}", 0


# 3e-3: the rate of the (IA)^3 paper (T-Few); the vectors start at one and need large steps.
# The backward pass still runs through the frozen body for activation gradients.
# one vector per adapted layer: keys and values (2h) and the MLP's inner activation (~4h).
# DP-SGD: torch.func over the whole model; PEFT holds the vectors in a ParameterDict, a module no
# forward pass runs through, so Opacus's layer hooks would never see them.
register(MethodSpec("ia3", Ia3Method, apply, default_lr=3e-3, train_pass_cost=2.5, peft=True, family="parameter-based",
                    flop_class="frozen-body", estimate_trainable=lambda shape, method: 6.0 * shape.hidden * shape.layers,
                    check=check, dp_gradients=lambda method: "torch.func"))
