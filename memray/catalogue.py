"""The model and GPU catalogue: the study models' aliases and sizes, the built-in tiny
models, the GPU types a resource rule may bind trials to, and the `model:` section. Below
every other module that reads them (config, models, planning), so that a bad name is
caught while the config is validated, before anything heavy is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from memray.gguf_bases import PACKAGED as GGUF_ALIASES, is_gguf
from memray.schema import Schema

#: Study models: alias -> Hugging Face hub id.
MODEL_ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
}
#: Approximate parameter counts: default resources, the longest-first order and the report's
#: model sizes use them.
APPROX_PARAMS: dict[str, float] = {
    "tiny-gpt2": 1e6, "tiny-llama": 1e6,
    "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9,
    "llama-3.2-1b": 1.24e9, "llama-2-7b": 6.74e9,
}
UNKNOWN_PARAMS = 7e9  # a hub id or local path of unknown size: assume large (a whole GPU, scheduled first)
#: Models built locally from a small config (random weights, shipped tokenizer); no network.
BUILTIN_MODELS: tuple[str, ...] = ("tiny-gpt2", "tiny-llama")

#: GPU types a resource rule may bind trials to (`gpu_type`): name -> (the GPU as CUDA names
#: it, its memory in GB). Each is a Ray custom resource that every GPU of a node of that type
#: carries once (launch/cluster.yaml's node types, launch/rayjob.yaml's worker groups).
GPU_TYPES: dict[str, tuple[str, float]] = {
    "a10g_24gb": ("A10G", 24),  # AWS g5
    "l4_24gb": ("L4", 24),  # AWS g6, GCP g2
    "a100_40gb": ("A100", 40),  # AWS p4d
    "a100_80gb": ("A100", 80),  # AWS p4de
    "h100_80gb": ("H100", 80),  # AWS p5
}


class ModelConfig(Schema):
    name: str = "tiny-gpt2"  # alias, built-in, packaged GGUF alias, hub id ("org/name"), local folder or .gguf file
    revision: str | None = None  # hub revision; part of the reference-statistics cache key
    pretrained: bool = True  # built-ins: start from the cached tiny base trained on pydoc text
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPUs that have it

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name in MODEL_ALIASES or name in BUILTIN_MODELS or is_gguf(name):
            return name  # a .gguf path is checked (and converted) when the model is loaded
        if "/" in name or name.startswith((".", "~")) or Path(name).expanduser().exists():
            return name  # a hub id or a local path: checked when the model is loaded
        choices = ", ".join([*MODEL_ALIASES, *BUILTIN_MODELS, *GGUF_ALIASES])
        raise ValueError(
            f"{name!r} is not a known alias ({choices}), a local path, or a hub id (org/name)"
        )

    @model_validator(mode="after")
    def _gguf_has_no_revision(self) -> "ModelConfig":
        if self.revision is not None and is_gguf(self.name):
            raise ValueError(f"revision: {self.name} is a GGUF file, which has no hub revision")
        return self
