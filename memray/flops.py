"""Model FLOPs per token and the GPUs' peak rates: model-FLOPs utilization (MFU).

MFU counts 2N FLOPs per token for a forward pass, N the parameters used in matrix products
(embedding tables excluded, the output layer included); a training pass by the method's
FLOP class (`memray.methods.FLOP_CLASSES`): 6N when every weight is trained, 4N plus
2 x trainable for methods that back-propagate through a frozen body (adapters, soft
prompts), 2N plus 2 x output layer when only the output layer is trained; attention adds
12 x layers x hidden x context per token when trained (4 x ... forward only), context
being the token-weighted mean sample length (PaLM's convention, causal masking not
discounted). Peak rates are dense bf16 from the vendors' datasheets (`PEAK_BF16_TFLOPS`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

#: Dense bf16 peak TFLOP/s by GPU name (vendors' datasheets); the first matching key wins.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.4),
    (("H100", "PCIe"), 756.0),
    (("H100",), 989.4),  # SXM (nvidia-smi: "H100 80GB HBM3")
    (("A100",), 312.0),
    (("L40S",), 362.1),
    (("L4",), 121.0),
    (("A10G",), 70.0),  # AWS's A10 variant (g5): fewer tensor FLOP/s than the A10's 125
)


def matmul_params(model: nn.Module) -> int:
    """Parameters used in matrix products: all but embedding tables, the output layer included."""
    embeddings = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    head = model.get_output_embeddings().weight
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings or p is head)


def attention_flops(config: PretrainedConfig, context: float, trained: bool) -> float:
    """Attention-score FLOPs per token (QK^T and AV), x3 when back-propagated."""
    text = config.get_text_config()
    forward = 4 * text.num_hidden_layers * text.hidden_size * context
    return 3 * forward if trained else forward


def train_flops_per_token(flop_class: str, n_matmul: int, n_trainable: int, n_head: int, config: PretrainedConfig,
                          context: float) -> float:
    """Model FLOPs per trained token (see the module docstring) of a method of `flop_class`
    (its registry entry's, one of `memray.methods.FLOP_CLASSES`)."""
    if flop_class == "all-weights":
        return 6 * n_matmul + attention_flops(config, context, trained=True)
    if flop_class == "output-layer":
        return 2 * n_matmul + 2 * n_head + attention_flops(config, context, trained=False)
    if flop_class == "frozen-body":
        return 4 * n_matmul + 2 * n_trainable + attention_flops(config, context, trained=True)
    raise ValueError(f"unknown FLOP class {flop_class!r}")


def mean_context(token_ids: list[list[int]]) -> float:
    """Token-weighted mean sample length: the context an average token attends over."""
    return sum(len(ids) ** 2 for ids in token_ids) / max(sum(len(ids) for ids in token_ids), 1)


def peak_tflops(device: torch.device) -> tuple[float | None, str | None]:
    """(dense bf16 peak TFLOP/s, GPU name) of a CUDA device; (None, name) when unknown."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for keys, tflops in PEAK_BF16_TFLOPS:
        if all(key in name for key in keys):
            return tflops, name
    return None, name


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device, workers: int = 1) -> float | None:
    """Model-FLOPs utilization at `tokens_per_s` (all workers together) on `workers` GPUs
    like `device`; None off CUDA or on a GPU whose peak rate is not known."""
    peak, _ = peak_tflops(device)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12 * workers)
