"""The training loop of one trial: transformers' `Trainer` with a per-epoch hook.

`Trainer` gives us gradient accumulation, bf16, schedulers, sharded checkpoints with
optimizer and RNG state, resume, and DeepSpeed, all maintained upstream. memray adds one
callback: at the end of every epoch it runs the trial's evaluation, then, once the
epoch's checkpoint is on disk, hands the metrics and the checkpoint folder to the trial
(so a reported epoch always has a checkpoint to resume from).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from memray.config import TrainConfig

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# transformers 5 renamed `gradient_checkpointing` (deprecated) to `activation_checkpointing`
_CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                      else "gradient_checkpointing")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the trial is marked failed with this reason."""


class TokenDataset(Dataset):
    """Pre-tokenized samples; the collator pads them per batch and builds the labels."""

    def __init__(self, token_ids: list[list[int]]):
        self.token_ids = token_ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.token_ids[index]}


@dataclass
class EpochEnd:
    """What the per-epoch hook receives."""

    epoch: int
    train_loss: float
    checkpoint_dir: Path | None


def use_bf16(precision: str) -> bool:
    """bf16 mixed precision: on request, or `auto` on a GPU that supports it (never on CPU)."""
    if precision == "fp32":
        return False
    available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not available:
        raise RuntimeError("train.precision is bf16 but no GPU with bf16 support is visible")
    return available


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest `checkpoint-<step>` folder that finished writing (has trainer_state.json)."""
    if not checkpoints_dir.is_dir():
        return None
    found = []
    for child in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


class _EpochHook(TrainerCallback):
    """Evaluates after every epoch and reports once the epoch's checkpoint exists."""

    def __init__(self, evaluate: Callable[[int], None], on_epoch_end: Callable[[EpochEnd], None], saving: bool):
        self.evaluate = evaluate
        self.on_epoch_end_hook = on_epoch_end
        self.saving = saving
        self.train_loss = math.nan
        self.epoch = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        # Trainer order at an epoch's end: on_epoch_end -> log -> save -> on_save.
        self.epoch = round(state.epoch)
        self.evaluate(self.epoch)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])
            if not math.isfinite(self.train_loss):
                raise TrainingDiverged(f"training loss is {self.train_loss} in epoch {math.ceil(state.epoch)}")
            if not self.saving:  # logging is per epoch, so this is the epoch's end
                self.on_epoch_end_hook(EpochEnd(self.epoch, self.train_loss, None))

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.on_epoch_end_hook(EpochEnd(self.epoch, self.train_loss, checkpoint))


def fit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_ids: list[list[int]],
    train: TrainConfig,
    *,
    lr: float,
    seed: int,
    checkpoints_dir: Path,
    evaluate: Callable[[int], None],
    on_epoch_end: Callable[[EpochEnd], None],
    resume_from: Path | None = None,
    progress: bool = True,
    deepspeed: dict | None = None,
    gradient_checkpointing: bool = False,
) -> None:
    """Train `model` on `train_ids` for `train.epochs` epochs.

    `evaluate(epoch)` runs after each epoch on the model in memory; `on_epoch_end` runs
    after that epoch's checkpoint (if any) is written. `resume_from` continues from a
    checkpoint folder written by an earlier call (its epoch, optimizer and RNG state).
    `deepspeed`: a DeepSpeed config (memray.distributed.deepspeed_config) when this is one
    worker of a data-parallel trial; torch.distributed must already be set up.
    `gradient_checkpointing`: recompute activations in the backward pass.
    """
    saving = train.checkpoints
    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
        num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=train.scheduler,
        max_grad_norm=train.max_grad_norm,
        bf16=use_bf16(train.precision),
        seed=seed,
        data_seed=seed,
        logging_strategy="epoch",
        save_strategy="epoch" if saving else "no",
        save_total_limit=train.keep_checkpoints if saving else None,
        eval_strategy="no",
        report_to="none",  # metrics go through memray's own report (W&B is the sweep's job)
        disable_tqdm=not progress,
        dataloader_num_workers=0,  # samples are pre-tokenized: a worker process costs more than it saves
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed,
        **({_CHECKPOINTING_ARG: True} if gradient_checkpointing else {}),
        logging_nan_inf_filter=False,  # a NaN loss must fail the trial, not be hidden
        save_only_model=False,
    )
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(train_ids),
        data_collator=collator,
        callbacks=[_EpochHook(evaluate, on_epoch_end, saving)],
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # no per-step log lines
        hf_logging.disable_progress_bar()  # no "Writing model shards" bars
    os.makedirs(checkpoints_dir, exist_ok=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
