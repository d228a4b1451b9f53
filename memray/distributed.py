"""Data-parallel trials with DeepSpeed ZeRO: the DeepSpeed config a trial runs with, the
GPU memory a worker needs, and a ZeRO throughput benchmark.

A trial whose resource rule has `workers > 1` is one process per worker (memray.sweep
starts them with Ray Train and sets up torch.distributed); each calls
`memray.trial.run_trial` with a `Distributed` saying which rank it is. Every rank trains
its share of each batch; every rank runs the same per-epoch evaluation (under ZeRO-3 the
forward passes gather each layer's weights from all ranks, so all must take part), and
rank 0 alone writes the trial folder. Nothing here imports Ray.

    memray bench-zero --model-shape gpt2-xl --steps 200

fine-tunes a random-weight model of that shape under ZeRO on this machine's GPU (or
CPU) and prints tokens/s, peak memory and the inputs of MFU; under
`torchrun --nproc_per_node N` it runs on N GPUs.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from memray.config import DeepSpeedConfig, TrainConfig

#: Below this many parameters every worker keeps the whole model (ZeRO-2); above, weights are partitioned too.
ZERO3_FROM_PARAMS = 1e9
#: From this many parameters activations are recomputed in the backward pass by default.
CHECKPOINTING_FROM_PARAMS = 3e9
DEEPSPEED_FILE = "deepspeed.json"  # the resolved DeepSpeed config, in the trial folder
GIB = 2**30


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel trial; torch.distributed is already set up."""

    rank: int
    world_size: int

    @property
    def lead(self) -> bool:
        """Rank 0 evaluates, writes the trial folder and prints progress."""
        return self.rank == 0

    def from_lead(self, *values: Any) -> list[Any]:
        """Rank 0's values on every rank (a broadcast): decisions all ranks must share."""
        objects = list(values)
        torch.distributed.broadcast_object_list(objects, src=0)
        return objects


class EvalReplica:
    """Rank 0's plain copy of a ZeRO-3 model, refreshed from the partitioned weights for
    each evaluation. Under ZeRO-3 no rank holds whole weights between forward passes, and
    the partitioned module runs only when every rank runs it; the copy lets rank 0
    evaluate alone, with the single-process code, on exactly the trained weights. It is
    made before DeepSpeed takes the model (afterwards transformers would build any new
    model partitioned, a collective) and waits on CPU between evaluations."""

    def __init__(self, model: torch.nn.Module, lead: bool):
        self.lead = lead
        self.model = copy.deepcopy(model).to("cpu") if lead else None

    def refresh(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
        """Gather `model`'s weights one tensor at a time (a collective: every rank calls
        this) into the copy on `device`; the copy on rank 0, None elsewhere."""
        import deepspeed

        if self.lead:
            self.model.to(device)
            replica = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None), torch.no_grad():
                if self.lead:
                    replica[name].copy_(param.data.view(replica[name].shape))
        return self.model

    def offload(self) -> None:
        if self.model is not None:
            self.model.to("cpu")


# ---------------------------------------------------------------------------------------
# The DeepSpeed config of a trial
# ---------------------------------------------------------------------------------------


def resolve_zero(settings: DeepSpeedConfig | None, params: float) -> DeepSpeedConfig:
    """`train.deepspeed` with every unset knob filled by model size (`params`)."""
    settings = settings or DeepSpeedConfig()
    stage = settings.stage or (2 if params < ZERO3_FROM_PARAMS else 3)
    checkpointing = settings.activation_checkpointing
    if checkpointing is None:
        checkpointing = params >= CHECKPOINTING_FROM_PARAMS
    return DeepSpeedConfig(stage=stage, offload_optimizer=settings.offload_optimizer,
                           offload_params=settings.offload_params, activation_checkpointing=checkpointing)


def deepspeed_config(train: TrainConfig, zero: DeepSpeedConfig, workers: int, bf16: bool, lr: float) -> dict[str, Any]:
    """The DeepSpeed JSON for transformers' Trainer, every value explicit (no "auto").

    train.batch_size is per worker: the global batch is batch_size x grad_accum x workers.
    Without optimizer offload the Trainer's own torch AdamW is handed to DeepSpeed, so the
    update is the one a single-process trial makes; with it, DeepSpeed's CPU Adam runs it.
    """
    offload = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    zero_section: dict[str, Any] = {
        "stage": zero.stage,
        "overlap_comm": torch.cuda.is_available(),  # overlap needs a CUDA stream
        "contiguous_gradients": True,
    }
    if zero.offload_optimizer:
        zero_section["offload_optimizer"] = offload
    if zero.offload_params:
        zero_section["offload_param"] = offload
    if zero.stage == 3:
        # epoch checkpoints are DeepSpeed's sharded ones; no gathered copy is written beside them
        zero_section["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * workers,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero_section,
        "steps_per_print": 10**9,  # progress goes through memray's own per-epoch report
        "wall_clock_breakdown": False,
    }
    if zero.offload_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay}}
    else:
        config["zero_force_ds_cpu_optimizer"] = False  # the Trainer's torch AdamW, also on CPU
    return config


# ---------------------------------------------------------------------------------------
# GPU memory per worker
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate and the FLOP count need to know of a model."""

    params: int
    hidden: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers `PretrainedConfig`; parameters counted on the meta device (no memory)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        return cls(params=params, hidden=config.hidden_size, layers=config.num_hidden_layers,
                   heads=config.num_attention_heads, vocab=config.vocab_size)

    @property
    def largest_layer_params(self) -> int:
        """The embedding matrix or one transformer block, whichever is larger."""
        embedding = self.vocab * self.hidden
        return max(embedding, (self.params - embedding) // max(self.layers, 1))


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU memory one worker needs, in GiB (written GB, as everywhere in memray)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def describe(self) -> str:
        return (f"~{self.total:.1f} GB/GPU (weights {self.weights:.1f}, grads {self.gradients:.1f}, "
                f"optimizer {self.optimizer:.1f}, activations {self.activations:.1f})")


#: CUDA context, kernels and allocator slack: about 1 GB whatever the model.
OVERHEAD_GB = 1.0


def estimate_memory(shape: ModelShape, *, trainable_params: float | None = None, workers: int = 1,
                    stage: int = 0, offload_optimizer: bool = False, offload_params: bool = False,
                    batch_size: int = 1, seq_len: int = 1024, bf16: bool = True,
                    activation_checkpointing: bool = False, per_sample_gradients: int = 0,
                    activation_factor: float = 1.0) -> MemoryEstimate:
    """GPU memory one worker needs to train `shape` with AdamW.

    stage 0 is a plain single-process trial (fp32 weights, bf16 autocast): 4 bytes of
    weights, 4 of gradients and 8 of Adam moments per trained parameter. Under DeepSpeed
    with bf16 the weights and gradients are 16-bit and the optimizer holds an fp32 master
    copy and both moments (2 + 2 + 12 bytes; Rajbhandari et al. 2020, arXiv 1910.02054);
    in fp32, 4 + 4 + 8. ZeRO partitions over the workers the optimizer states (stage >= 1),
    the gradients (>= 2) and the weights (3, which then gathers about two layers at a
    time). Offloading moves the optimizer states and their gradients, or the weights, to
    CPU memory. Activations (Korthikanti et al. 2022, arXiv 2205.05198, with attention
    that keeps no score matrix, e.g. SDPA): 34 bytes x sequence x batch x hidden per layer
    in 16 bits, or only each layer's input with activation checkpointing, plus the
    logits and their fp32 loss copies. `per_sample_gradients` (DP-SGD): that many more fp32
    copies of the trained weights' gradients, one per text of a chunk (either engine of
    memray.dp); `activation_factor`: the layers' activations times this (DP-SGD's per-sample
    gradients by torch.func keep about twice a plain pass's).
    """
    params = shape.params
    trained = params if trainable_params is None else trainable_params
    if stage == 0:
        weight_bytes, grad_bytes, optim_bytes = 4, 4, 8
    elif bf16:
        weight_bytes, grad_bytes, optim_bytes = 2, 2, 12
    else:
        weight_bytes, grad_bytes, optim_bytes = 4, 4, 8
    optim_share = workers if stage >= 1 else 1
    grad_share = workers if stage >= 2 else 1
    weight_share = workers if stage == 3 else 1

    weights = weight_bytes * params / weight_share
    if stage == 3:
        weights = 0 if offload_params else weights
        weights += 2 * weight_bytes * shape.largest_layer_params  # gathered layer and the prefetched next one
    gradients = 0.0 if offload_optimizer and stage >= 2 else grad_bytes * trained / grad_share
    gradients += 4 * trained * per_sample_gradients
    optimizer = 0.0 if offload_optimizer else optim_bytes * trained / optim_share

    act_bytes = 2 if bf16 else 4
    tokens = batch_size * seq_len
    per_layer = 17 * act_bytes * tokens * shape.hidden  # 34 bytes/(token x hidden) at 2 bytes per value
    if activation_checkpointing:
        activations = shape.layers * act_bytes * tokens * shape.hidden + per_layer
    else:
        activations = shape.layers * per_layer
    activations *= activation_factor
    activations += tokens * shape.vocab * (act_bytes + 8)  # logits, their fp32 copy and its gradient
    return MemoryEstimate(weights / GIB, gradients / GIB, optimizer / GIB, activations / GIB, OVERHEAD_GB)


# ---------------------------------------------------------------------------------------
# ZeRO throughput benchmark
# ---------------------------------------------------------------------------------------

#: A shape for quick runs on a CPU, beside the study aliases' published shapes.
TINY_SHAPE = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0}


def bench_config(name: str) -> Any:
    """The transformers config of `tiny` or a study alias (its published shape; random
    weights, nothing downloaded)."""
    from transformers import GPT2Config

    from memray.models import PUBLISHED_CONFIGS

    if name == "tiny":
        return GPT2Config(**TINY_SHAPE)
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"{name!r} is not one of tiny, {', '.join(PUBLISHED_CONFIGS)}")
    return PUBLISHED_CONFIGS[name]()


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's
    12 x layers x hidden x sequence (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022)."""
    return 6 * shape.params + 12 * shape.layers * shape.hidden * seq_len


#: A JIT build of a DeepSpeed op (the CPU communication op `deepspeed_shm_comm`, cpu_adam)
#: takes a minute or two; a build lock older than this was left by a process killed mid-build.
STALE_BUILD_LOCK_S = 900.0


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove the torch-extension build locks (`<extensions dir>/<op>/lock`) older than
    `max_age_s`: a process killed while it JIT-built an op leaves its lock, and every later
    build of the op (each multi-worker trial's first use of it) waits on it forever. Returns
    the locks removed, each also named in a warning."""
    import warnings
    from pathlib import Path

    root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) if os.environ.get("TORCH_EXTENSIONS_DIR") else None
    if root is None:  # torch's default: <build root>/py<version>_<accelerator>
        from torch.utils.cpp_extension import get_default_build_root

        accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip
                       else f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        root = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}"
    removed = []
    for lock in root.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except OSError:  # another worker removed it first
            continue
    for lock in removed:
        warnings.warn(f"removed {lock}, a build lock {STALE_BUILD_LOCK_S / 60:.0f}+ minutes old that a process "
                      "killed while building a DeepSpeed op left behind", stacklevel=2)
    return removed


def _init_process_group() -> None:
    """A process group for DeepSpeed: the one torchrun describes, else a group of one."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def zero_throughput(model_config: Any, *, stage: int = 3, steps: int = 20, warmup: int = 3, batch: int = 4,
                    length: int = 1024, offload_optimizer: bool = False, offload_params: bool = False,
                    activation_checkpointing: bool = False, peak_tflops: float | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Fine-tune a random-weight model built from `model_config` under ZeRO for `steps`
    timed steps (after `warmup` untimed ones) on random tokens; one worker per process of
    the torch.distributed group (torchrun), or this process alone.

    batch: sequences per worker and step; length: tokens per sequence. bf16 on a GPU that
    has it, fp32 on CPU. Returns tokens_per_s (all workers), step_s, peak_mem_gb (this
    worker), params, flops_per_token, achieved_tflops (per worker) and, given the
    hardware's peak_tflops per worker, mfu.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM

    _init_process_group()
    world = torch.distributed.get_world_size()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config)
    if activation_checkpointing:
        model.gradient_checkpointing_enable()
    shape = ModelShape(params=sum(p.numel() for p in model.parameters()), hidden=model_config.hidden_size,
                       layers=model_config.num_hidden_layers, heads=model_config.num_attention_heads,
                       vocab=model_config.vocab_size)
    zero = DeepSpeedConfig(stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                           activation_checkpointing=activation_checkpointing)
    config = deepspeed_config(TrainConfig(batch_size=batch), zero, world, bf16, lr=1e-5)
    config.pop("zero_force_ds_cpu_optimizer", None)
    config.setdefault("optimizer", {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}})
    config["optimizer"]["params"]["torch_adam"] = not offload_optimizer  # no fused-op build; CPU Adam when offloaded
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      dist_init_required=False)
    device = engine.device
    generator = torch.Generator().manual_seed(seed + torch.distributed.get_rank())
    tokens = torch.randint(0, model_config.vocab_size, (batch, length), generator=generator).to(device)

    def step() -> float:
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = world * batch * length * steps / elapsed
    per_token = flops_per_token(shape, length)
    achieved = tokens_per_s / world * per_token / 1e12
    peak = (torch.cuda.max_memory_allocated() / GIB if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {
        "stage": stage, "workers": world, "batch": batch, "length": length, "steps": steps,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "bf16": bf16,
        "params": shape.params, "tokens_per_s": tokens_per_s, "step_s": elapsed / max(steps, 1),
        "peak_mem_gb": peak, "flops_per_token": per_token, "achieved_tflops": achieved,
        "peak_tflops": peak_tflops, "mfu": achieved / peak_tflops if peak_tflops else None,
        "first_loss": losses[0] if losses else math.nan, "last_loss": losses[-1] if losses else math.nan,
        "estimate": asdict(estimate_memory(shape, workers=world, stage=stage, offload_optimizer=offload_optimizer,
                                           offload_params=offload_params, batch_size=batch, seq_len=length,
                                           bf16=bf16, activation_checkpointing=activation_checkpointing)),
    }
