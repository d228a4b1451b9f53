"""`head`: only the output layer is trained."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from memray.methods import MethodSchema, MethodSpec, register
from memray.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class HeadMethod(MethodSchema):
    """Only the output layer trained."""

    name: Literal["head"] = "head"
    # Tied embeddings (GPT-2) share the output layer with the input embeddings. untie=True
    # trains a separate copy of the output layer and leaves the input embeddings frozen;
    # untie=False trains the shared matrix, so the input embeddings change too.
    untie: bool = True


def check(model: "torch.nn.Module", method: HeadMethod, source: str) -> None:
    if model.get_output_embeddings() is None:
        raise ConfigError(source, "method.name", f"head: {type(model).__name__} has no output layer to train")


def apply(model: "PreTrainedModel", method: HeadMethod, source: str) -> "tuple[torch.nn.Module, str, int]":
    import torch

    check(model, method, source)
    head = model.get_output_embeddings()
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


# 1e-4: one pretrained matrix, which can take a larger step than full fine-tuning. The
# backward pass stops at the output layer: about half a forward pass more.
register(MethodSpec("head", HeadMethod, apply, default_lr=1e-4, train_pass_cost=1.5, peft=False, family="parameter-based",
                    flop_class="output-layer", estimate_trainable=lambda shape, method: shape.vocab * shape.hidden,
                    check=check, dp_gradients=lambda method: "opacus"))
