"""`prefix`: trained keys and values prepended in every layer (Li & Liang 2021,
arXiv 2101.00190)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from memray.methods import MethodSchema, MethodSpec, Shape, register
from memray.methods._modules import peft_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class PrefixMethod(MethodSchema):
    name: Literal["prefix"] = "prefix"
    virtual_tokens: int = Field(20, gt=0)
    projection: bool = False  # reparameterize the prefix through an MLP (Li & Liang 2021)


def apply(model: "PreTrainedModel", method: PrefixMethod, source: str) -> "tuple[torch.nn.Module, str, int]":
    from peft import PrefixTuningConfig, TaskType

    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.virtual_tokens,
                                prefix_projection=method.projection)
    how = ", produced by an MLP" if method.projection else ""
    trained = f"a {method.virtual_tokens}-position prefix of keys and values in every layer{how}"
    return peft_model(model, config, source, "method.name"), trained, 0


# 1e-3: a few thousand fresh parameters that must travel far from their init; lower than
# PEFT's soft-prompt guides (up to 3e-2) because a trial runs many epochs and the raw prefix
# without its MLP is known to be unstable (Li & Liang 2021).
def estimate_trainable(shape: Shape, method: PrefixMethod) -> float:
    """A key and a value per layer and virtual token; with the projection, PEFT's MLP
    (h -> h -> 2 x layers x h) from a virtual-token embedding instead. Keys and values
    counted at the hidden size: a model with fewer key-value heads (grouped-query
    attention) trains proportionally fewer."""
    if method.projection:
        return float(method.virtual_tokens * shape.hidden + shape.hidden ** 2 + 2 * shape.layers * shape.hidden ** 2)
    return float(2 * method.virtual_tokens * shape.layers * shape.hidden)


register(MethodSpec("prefix", PrefixMethod, apply, default_lr=1e-3, train_pass_cost=2.5, peft=True, family="prompt-based",
                    flop_class="frozen-body", estimate_trainable=estimate_trainable,
                    dp_gradients=lambda method: "opacus"))
