"""`lora`: low-rank adapters on chosen linear layers (Hu et al. 2021, arXiv 2106.09685),
optionally weight-decomposed (DoRA, Liu et al. 2024, arXiv 2402.09353)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from memray.methods import MethodSchema, MethodSpec, Shape, register
from memray.methods._modules import BLOCK_MODULES, family, layers_text, peft_model, require_matches
from memray.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


#: Placements by how much LoRA memorizes with them, least first: Hou et al. 2025 (arXiv
#: 2507.00258) found LoRA on the MLP / projection layers above LoRA on attention, and both
#: highest. The report's findings test this order on a sweep's results.
PLACEMENT_ORDER: tuple[str, ...] = ("attn", "mlp", "both")


class LoraMethod(MethodSchema):
    name: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    placement: Literal["attn", "mlp", "both"] = "attn"
    target_modules: list[str] | None = None  # escape hatch: overrides placement
    # DoRA: each adapted weight split into a magnitude vector and a direction; LoRA adapts the
    # direction and the magnitude is trained too (closer to full fine-tuning at LoRA's size)
    dora: bool = False

    label_keys = ("rank", "placement", "target_modules", "dora")
    added_later = {"dora": False}
    bench_variants = ({"dora": True},)
    report_axes = ("placement", "rank")
    report_title = "LoRA placement and rank"

    def slug(self) -> str:
        return f"lora_r{self.rank}-{self.placement}{'-dora' if self.dora else ''}"

    def label(self) -> str:
        placement = "custom" if self.target_modules else self.placement
        return f"{'dora' if self.dora else 'lora'} ({placement}, r{self.rank})"

    def report_point(self) -> tuple[str, float] | None:
        return None if self.target_modules else (self.placement, self.rank)


def targets(model: "torch.nn.Module", method: LoraMethod, source: str = "config") -> list[str]:
    """Module-name suffixes LoRA attaches to: method.target_modules, or method.placement
    mapped for the model's family. ConfigError if one of them matches no adaptable module."""
    model_type = family(model)
    if method.target_modules:
        names = list(method.target_modules)
        require_matches(model, names, source, "method.target_modules")
        return names
    if model_type not in BLOCK_MODULES:
        raise ConfigError(source, "method.placement", f"no LoRA placement is known for model type {model_type!r}; "
                                                      f"set method.target_modules ({layers_text(model)})")
    blocks = ["attn", "mlp"] if method.placement == "both" else [method.placement]
    names = [suffix for block in blocks for suffix in BLOCK_MODULES[model_type][block]]
    require_matches(model, names, source, "method.placement", f"placement {method.placement!r} -> {', '.join(names)}: ")
    return names


def check(model: "torch.nn.Module", method: LoraMethod, source: str) -> None:
    targets(model, method, source)


def apply(model: "PreTrainedModel", method: LoraMethod, source: str) -> "tuple[torch.nn.Module, str, int]":
    from peft import LoraConfig, TaskType
    from peft.tuners.lora import LoraLayer

    names = targets(model, method, source)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=method.rank, lora_alpha=method.alpha,
                        lora_dropout=method.dropout, target_modules=names, use_dora=method.dora,
                        fan_in_fan_out=model.config.model_type == "gpt2")  # Conv1D stores weights transposed
    wrapped = peft_model(model, config, source, "method.target_modules" if method.target_modules else "method.placement")
    adapted = sum(isinstance(module, LoraLayer) for module in wrapped.modules())
    kind = "DoRA" if method.dora else "LoRA"
    return wrapped, f"{kind} r={method.rank} alpha={method.alpha:g} on {', '.join(names)} ({adapted} modules)", 0


def dp_gradients(method: LoraMethod) -> str:
    """LoRA's adapters are nn.Linear layers run on each text's activations: Opacus's layer rule.
    DoRA's magnitude vector is trained inside a module whose forward takes the adapter as
    keyword arguments, which Opacus's hooks do not see: torch.func over the whole model."""
    return "torch.func" if method.dora else "opacus"


# 2e-4: B starts at zero and the update is scaled by alpha/r; the rate Hu et al. 2021 used
# for GPT-2. The frozen body still needs activation gradients, not weight gradients.
def estimate_trainable(shape: Shape, method: LoraMethod) -> float:
    """r x (fan-in + fan-out) per adapted matrix: per layer four h x h attention matrices
    (8rh) and MLP matrices of about 5h fan-in + fan-out each, three of them as in Llama
    (15rh); custom targets counted as the attention ones."""
    per_layer = {"attn": 8, "mlp": 15, "both": 23}[method.placement]
    return float(per_layer * method.rank * shape.hidden * shape.layers)


register(MethodSpec("lora", LoraMethod, apply, default_lr=2e-4, train_pass_cost=2.5, peft=True, family="parameter-based",
                    flop_class="frozen-body", estimate_trainable=estimate_trainable, check=check,
                    dp_gradients=dp_gradients))
