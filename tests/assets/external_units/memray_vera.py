"""A fine-tuning method from outside memray: VeRA (Kopiczko et al. 2024, arXiv 2310.11454),
random frozen low-rank matrices shared by every adapted layer, with trained scaling vectors.
Registered through the `memray.methods` entry point of the package that holds it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memray.methods import MethodSchema, MethodSpec, register


class VeraMethod(MethodSchema):
    name: Literal["vera"] = "vera"
    rank: int = Field(32, gt=0)

    def slug(self) -> str:
        return f"vera_r{self.rank}"


def apply(model, method: VeraMethod, source: str):
    from peft import VeraConfig, get_peft_model

    gpt2 = model.config.model_type == "gpt2"
    targets = ["c_attn"] if gpt2 else ["q_proj"]
    config = VeraConfig(r=method.rank, target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=gpt2)
    return get_peft_model(model, config), f"VeRA r={method.rank} on {', '.join(targets)}", 0


register(MethodSpec("vera", VeraMethod, apply, default_lr=5e-3, train_pass_cost=2.5, peft=True,
                    family="parameter-based", flop_class="frozen-body",
                    estimate_trainable=lambda shape, method: float((method.rank + 3 * shape.hidden) * shape.layers)))
