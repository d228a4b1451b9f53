"""`prompt`: a trained soft prompt prepended to the input embeddings (Lester et al. 2021,
arXiv 2104.08691)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from memray.methods import MethodSchema, MethodSpec, register
from memray.methods._modules import peft_model
from memray.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: Prompt tuning's text init when method.init_text is not set: neutral, no task in it.
DEFAULT_INIT_TEXT = "Continue the following text:"


class PromptMethod(MethodSchema):
    name: Literal["prompt"] = "prompt"
    virtual_tokens: int = Field(20, gt=0)
    init: Literal["random", "text"] = "random"
    init_text: str | None = None  # with init=text; default: a neutral instruction

    @model_validator(mode="after")
    def _init_text(self) -> "PromptMethod":
        if self.init_text is not None and self.init != "text":
            raise ValueError("init_text is only used with init: text")
        return self


def apply(model: "PreTrainedModel", method: PromptMethod, source: str) -> "tuple[torch.nn.Module, str, int]":
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

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
    return peft_model(model, config, source, "method.init"), trained, method.virtual_tokens


# 3e-3: fresh embeddings that must travel far from their init (PEFT's guides use up to 3e-2).
# DP-SGD: torch.func over the whole model; PEFT encodes the soft prompt once per batch and
# repeats it over the texts (PeftModel.get_prompt), so a layer rule would see one text.
register(MethodSpec("prompt", PromptMethod, apply, default_lr=3e-3, train_pass_cost=2.5, peft=True, family="prompt-based",
                    flop_class="frozen-body",
                    estimate_trainable=lambda shape, method: float(method.virtual_tokens * shape.hidden),
                    dp_gradients=lambda method: "torch.func"))
