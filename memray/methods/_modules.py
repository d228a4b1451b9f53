"""Module-name helpers shared by the methods that adapt named layers (LoRA, IA3): which
modules of a model family belong to its attention and MLP blocks, and a check that names
given by the user or by a family table match adaptable layers of the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memray.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig
    from transformers import PreTrainedModel

#: Block -> module-name suffixes, per model family (config.model_type). GPT-2 has a
#: `c_proj` in both its attention and its MLP block, so its suffixes name the block.
_LLAMA_LIKE = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
BLOCK_MODULES: dict[str, dict[str, list[str]]] = {
    "gpt2": {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "olmo2": _LLAMA_LIKE,
    "gpt_neox": {"attn": ["attention.query_key_value", "attention.dense"],
                 "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]},
    "opt": {"attn": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    "phi3": {"attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
}


def family(model: "torch.nn.Module") -> str | None:
    """The model's config.model_type (gpt2, llama, ...), or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def adaptable_modules(model: "torch.nn.Module", embeddings: bool = True) -> dict[str, "torch.nn.Module"]:
    """Modules an adapter can attach to: linear layers (GPT-2's are transformers' Conv1D),
    and embeddings when `embeddings` is set."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D, torch.nn.Embedding) if embeddings else (torch.nn.Linear, Conv1D)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def require_matches(model: "torch.nn.Module", targets: list[str], source: str, field: str, what: str = "",
                    embeddings: bool = True) -> None:
    """ConfigError naming `field` if one of the `targets` suffixes matches no adaptable
    module; the message lists the layers the model does have. `what` prefixes the message
    (e.g. how a placement mapped to these targets)."""
    adaptable = adaptable_modules(model, embeddings)
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in adaptable)]
    if missing:
        raise ConfigError(source, field, f"{what}{', '.join(missing)} match{'es' if len(missing) == 1 else ''} "
                                         f"no linear layer of this {family(model) or 'model'} model ({layers_text(model)})")


def layers_text(model: "torch.nn.Module") -> str:
    """'its linear layers: attn.c_attn, mlp.c_fc, ...': distinct 'block.leaf' names without
    layer numbers."""
    names = {".".join(p for p in name.split(".")[-2:] if not p.isdigit()) for name in adaptable_modules(model)}
    return f"its linear layers: {', '.join(sorted(names))}"


def peft_model(model: "PreTrainedModel", config: "PeftConfig", source: str, field: str) -> "torch.nn.Module":
    """PEFT's wrapper of `model`; PEFT's refusal becomes a ConfigError naming `field`."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise ConfigError(source, field, f"PEFT cannot apply this method to {type(model).__name__}: {err}") from None

