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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from memray.config import TrainConfig
from memray.models import transforms_logits_after_head

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


#: Vocabulary size from which `train.chunked_loss: auto` computes the loss in blocks
#: (GPT-2's 50k, Llama-3's 128k; a batch of 8 x 512 tokens has 1.6-4 GB of float32 logits).
CHUNKED_LOSS_VOCAB = 32768
#: Positions per block of the chunked loss: 1024 x 128k vocabulary x 4 B = 512 MB at most.
CHUNKED_LOSS_ROWS = 1024


class ChunkedLoss:
    """Next-token cross-entropy without the batch's full logits.

    While the model runs, its output layer returns its input (the final hidden states);
    the loss then projects `CHUNKED_LOSS_ROWS` positions at a time onto the vocabulary,
    each block under activation checkpointing, so that the backward pass recomputes one
    block's logits at a time too. The output layer's weight (tied or not, trained or not)
    gets its gradient through those blocks. The sum over tokens is divided exactly as
    transformers' own causal-LM loss divides it (by the tokens of the whole accumulated
    batch when the Trainer counts them), so the two give the same loss and gradients.
    """

    def __init__(self, head: torch.nn.Linear):
        self.head = head

    @staticmethod
    def applies(model: torch.nn.Module, train: TrainConfig, deepspeed: dict | None) -> bool:
        """Whether the trial's training uses it (`train.chunked_loss`, and a model it fits)."""
        if train.chunked_loss == "off" or deepspeed is not None or train.compile:
            return False  # ZeRO partitions the head's weight; compile traces the forward
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        config = base.config.get_text_config()
        if not isinstance(head, torch.nn.Linear) or transforms_logits_after_head(config):
            return False  # the chunked loss would skip what such a model does after its output layer
        return train.chunked_loss == "on" or head.out_features >= CHUNKED_LOSS_VOCAB

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ChunkedLoss":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return cls(base.get_output_embeddings())

    @contextmanager
    def hidden_states(self) -> Iterator[None]:
        """The output layer passes its input through (its weights stay where they are, so
        checkpoints and the per-epoch evaluation see the model unchanged)."""
        self.head.forward = _identity
        try:
            yield
        finally:
            del self.head.forward

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor,
                 num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        # prompt tuning / P-tuning put virtual tokens in front (the last one predicts the first
        # real token): their labels are -100, as PEFT pads them
        virtual = hidden.shape[1] - labels.shape[1]
        targets = torch.nn.functional.pad(labels, (virtual, 0), value=-100)[:, 1:]
        keep = targets != -100
        states, targets = hidden[:, :-1][keep], targets[keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, states.shape[0], CHUNKED_LOSS_ROWS):
            stop = start + CHUNKED_LOSS_ROWS
            total = total + checkpoint(_block_loss, states[start:stop], targets[start:stop], self.head.weight,
                                       self.head.bias, use_reentrant=False)
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        if torch.is_tensor(count):
            count = count.to(total.device)
        return total / count


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _block_loss(states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of one block of positions (logits upcast to float32, as
    transformers' loss does)."""
    logits = torch.nn.functional.linear(states, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


class _ProgressBar(ProgressCallback):
    """The Trainer's progress bar with the epoch and the last logged loss in the bar itself,
    instead of a raw `{'loss': ...}` dict printed under it at every log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(epoch=f"{state.epoch:.0f}", loss=f"{float(logs['loss']):.4g}")


class _Trainer(Trainer):
    """`Trainer` whose loss is the chunked loss when one is given."""

    def __init__(self, *args, chunked_loss: ChunkedLoss | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.chunked_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with self.chunked_loss.hidden_states():
            outputs = model(**inputs)
        loss = self.chunked_loss(outputs.logits, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales a summed loss
        return (loss, outputs) if return_outputs else loss


@dataclass
class EpochEnd:
    """What the per-epoch hook receives."""

    epoch: int
    train_loss: float
    checkpoint_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)  # the training's own (DP: privacy/epsilon)


def use_bf16(precision: str) -> bool:
    """bf16 mixed precision: on request, or `auto` on a GPU that supports it (never on CPU)."""
    if precision == "fp32":
        return False
    available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not available:
        raise RuntimeError("train.precision is bf16 but no GPU with bf16 support is visible")
    return available


def saved_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The `checkpoint-<step>` folders that finished writing (have trainer_state.json),
    oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return [child for _, child in sorted(found)]


class _EpochHook(TrainerCallback):
    """An epoch's end in two steps, in this order: `evaluate(epoch)` on the weights in
    memory, then `on_epoch_end(EpochEnd)` once the epoch's checkpoint is written.

    The Trainer's own order at an epoch's end is on_epoch_end -> (log -> on_log) ->
    (save -> on_save): the first step runs in its on_epoch_end, the second in on_save (or,
    without checkpoints, in on_log of the epoch's loss: logging is per epoch). The order is
    checked, so that a transformers release that changed it fails loudly rather than
    reporting an epoch with another epoch's measurements.
    """

    def __init__(self, evaluate: Callable[[int], None], on_epoch_end: Callable[[EpochEnd], None], saving: bool):
        self.evaluate = evaluate
        self.on_epoch_end_hook = on_epoch_end
        self.saving = saving
        self.train_loss = math.nan
        self.epoch = 0
        self.evaluated: int | None = None  # the epoch evaluated and not yet handed on

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch = round(state.epoch)
        self.evaluate(self.epoch)
        self.evaluated = self.epoch

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])
            if not math.isfinite(self.train_loss):
                raise TrainingDiverged(f"training loss is {self.train_loss} in epoch {math.ceil(state.epoch)}")
            if not self.saving:  # logging is per epoch, so this is the epoch's end
                self._hand_on(None)

    def on_save(self, args, state, control, **kwargs):
        self._hand_on(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def _hand_on(self, checkpoint: Path | None) -> None:
        if self.evaluated != self.epoch:
            raise RuntimeError(f"the Trainer ended epoch {self.epoch} (checkpoint or log) before its on_epoch_end: "
                               "memray measures an epoch on the weights in memory first")
        self.evaluated = None
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
    after that epoch's checkpoint (if any) is written, always in this order (`_EpochHook`). `resume_from` continues from a
    checkpoint folder written by an earlier call (its epoch, optimizer and RNG state).
    `deepspeed`: a DeepSpeed config (memray.distributed.deepspeed_config) when this is one
    worker of a data-parallel trial; torch.distributed must already be set up.
    `gradient_checkpointing`: recompute activations in the backward pass.
    A trial with `train.dp` trains with `memray.dp.fit_dp` instead (the same contract).
    """
    if train.dp is not None:
        raise ValueError("train.dp: DP-SGD trains with memray.dp.fit_dp, not the Trainer")
    saving = train.checkpoints
    on_gpu = torch.cuda.is_available()
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
        # page-locked batches copied without blocking: the next batch's copy overlaps this step
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": on_gpu},
        # similar lengths in a batch: little padding, so little compute spent on pad tokens
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        torch_compile=train.compile,
        remove_unused_columns=False,
        use_cpu=not on_gpu,
        deepspeed=deepspeed,
        **({_CHECKPOINTING_ARG: True} if gradient_checkpointing else {}),
        logging_nan_inf_filter=False,  # a NaN loss must fail the trial, not be hidden
        save_only_model=False,
    )
    # on a GPU, lengths padded to a multiple of 8 keep matrix shapes tensor-core friendly
    # (and the number of distinct shapes torch.compile sees small)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False, pad_to_multiple_of=8 if on_gpu else None)
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(train_ids),
        data_collator=collator,
        callbacks=[_EpochHook(evaluate, on_epoch_end, saving)],
        chunked_loss=ChunkedLoss.of(model) if ChunkedLoss.applies(model, train, deepspeed) else None,
    )
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_ProgressBar())
    else:
        trainer.remove_callback(PrinterCallback)  # no per-step log lines
        hf_logging.disable_progress_bar()  # no "Writing model shards" bars
    os.makedirs(checkpoints_dir, exist_ok=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
