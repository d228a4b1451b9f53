"""`ptuning`: a soft prompt produced by a trained MLP or LSTM encoder (Liu et al. 2021,
"GPT Understands, Too", arXiv 2103.10385)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from memray.methods import MethodSchema, MethodSpec, Shape, register
from memray.methods._modules import peft_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class PtuningMethod(MethodSchema):
    name: Literal["ptuning"] = "ptuning"
    virtual_tokens: int = Field(20, gt=0)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden: int | None = Field(None, gt=0)  # None: the model's hidden size


def apply(model: "PreTrainedModel", method: PtuningMethod, source: str) -> "tuple[torch.nn.Module, str, int]":
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType

    encoder = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
    hidden = method.encoder_hidden or model.config.get_text_config().hidden_size
    config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.virtual_tokens,
                                 encoder_reparameterization_type=encoder[method.encoder], encoder_hidden_size=hidden)
    trained = f"a {method.virtual_tokens}-token prompt produced by an {method.encoder.upper()} encoder (hidden {hidden})"
    return peft_model(model, config, source, "method.encoder"), trained, method.virtual_tokens


# 1e-3: like prefix tuning, fresh parameters behind an encoder that smooths their updates.
def estimate_trainable(shape: Shape, method: PtuningMethod) -> float:
    """The virtual-token embeddings and PEFT's encoder: an MLP h -> e -> e -> h, or a
    two-layer bidirectional LSTM (e each way) and an MLP head 2e -> 2e -> h (e = encoder_hidden)."""
    h, e = shape.hidden, method.encoder_hidden or shape.hidden
    encoder = h * e + e * e + e * h if method.encoder == "mlp" else 8 * e * (h + e) + 24 * e * e + 4 * e * e + 2 * e * h
    return float(method.virtual_tokens * h + encoder)


register(MethodSpec("ptuning", PtuningMethod, apply, default_lr=1e-3, train_pass_cost=2.5, peft=True, family="prompt-based",
                    flop_class="frozen-body", estimate_trainable=estimate_trainable,
                    # DP-SGD: the prompt is encoded once per batch and repeated, as prompt tuning's
                    dp_gradients=lambda method: "torch.func"))
