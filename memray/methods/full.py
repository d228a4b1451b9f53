"""`full`: every weight of the model is trained."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from memray.methods import MethodSchema, MethodSpec, register

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class FullMethod(MethodSchema):
    """All weights trained."""

    name: Literal["full"] = "full"


def apply(model: "PreTrainedModel", method: FullMethod, source: str) -> "tuple[torch.nn.Module, str, int]":
    model.requires_grad_(True)
    return model, "all weights", 0


# 5e-5: full fine-tuning moves every pretrained weight, so it takes the usual small step
# for fine-tuning; a training pass costs 3 forward passes (activation and weight gradients).
# The only method that trains on several workers (DeepSpeed ZeRO shards what every weight
# needs: its gradient and optimizer states); the default of a config without a method.
register(MethodSpec("full", FullMethod, apply, default_lr=5e-5, train_pass_cost=3.0, peft=False, family="parameter-based",
                    flop_class="all-weights", estimate_trainable=lambda shape, method: shape.params, multi_worker=True,
                    dp_gradients=lambda method: "opacus"),
         default=True)
