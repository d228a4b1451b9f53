"""One trial end to end: data -> model -> method -> training -> per-epoch memorization.

`run_trial` is a plain function: it takes a resolved `TrialConfig` and a `report`
callable and returns the last epoch's metrics. It knows nothing of Ray: the sweep passes
a `report` that forwards to Ray Tune, `memray trial` passes one that prints.

Every epoch (epoch 0 = before training) it measures validation loss / perplexity and
the membership-inference attacks on the same scored members and non-members, writes the
per-sample scores, appends the metrics to `result.json`, and reports them together with
the epoch's checkpoint folder. A trial that raises is marked failed with its reason.

A data-parallel trial (`distributed`) runs this in every worker process: each trains its
share of every batch under DeepSpeed ZeRO, rank 0 alone evaluates and writes the trial
folder, and every rank calls `report` once per epoch (with rank 0's metrics there, the
epoch alone elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from transformers import set_seed

from memray import attacks, data, extraction, flops, methods, metrics, models, scoring
from memray.config import TrialConfig
from memray.distributed import DEEPSPEED_FILE, Distributed, EvalReplica, deepspeed_config, resolve_zero
from memray.results import CHECKPOINTS_DIR, TrialRecord, atomic_write_text, write_scores, write_table
from memray.train import EpochEnd, fit, latest_checkpoint, use_bf16

Report = Callable[[dict[str, float], "Path | None"], None]

#: Metrics shown in the per-epoch table that `memray trial` prints.
TABLE_COLUMNS = ("epoch", "train/loss", "val/ppl")


def default_trial_dir(config: TrialConfig) -> Path:
    return Path(config.output_dir) / config.slug()


def run_trial(
    config: TrialConfig,
    report: Report | None = None,
    *,
    trial_dir: Path | None = None,
    resume: bool = True,
    cache_dir: Path | None = None,
    axes: dict[str, Any] | None = None,
    progress: bool = True,
    distributed: Distributed | None = None,
) -> dict[str, float]:
    """Run one trial; return the metrics of its last epoch.

    config: the resolved trial. report(metrics, checkpoint_dir): called once per epoch,
    epoch 0 included, after the epoch's checkpoint is written (None when there is none).
    trial_dir: where result files go (default `<output_dir>/<slug>`). resume: continue
    from the newest checkpoint in trial_dir, keeping the epochs already recorded.
    cache_dir: reference statistics and built-in base models (default `models.cache_dir()`).
    axes: the grid-cell values, recorded in result.json for reports.
    distributed: this process's rank in a data-parallel trial (torch.distributed set up by
    the caller; every rank passes the same arguments); None: a single-process trial.
    """
    trial_dir = Path(trial_dir) if trial_dir else default_trial_dir(config)
    record = TrialRecord.open(trial_dir) if resume else TrialRecord(trial_dir / "result.json")
    finished = resume and _finished(record, config)
    checkpoints_dir = trial_dir / CHECKPOINTS_DIR
    resume_from = latest_checkpoint(checkpoints_dir) if resume and not finished else None
    if distributed is not None:  # what rank 0 found before it writes anything
        finished, resume_from, record.data = distributed.from_lead(finished, resume_from, record.data)
        record.readonly = not distributed.lead
    if finished:
        return dict(record.epochs[-1])  # already done: nothing is re-run
    if resume_from is None:
        record.data["epochs"] = []
    record.start(config.resolved(), config.trial_id(), axes)
    if resume_from is not None:
        record.keep_epochs_up_to(_checkpoint_epoch(resume_from))
    try:
        final = _run(config, record, report, resume_from, Path(cache_dir) if cache_dir else None, progress,
                     distributed)
    except BaseException as err:  # KeyboardInterrupt too: the record must say why it stopped
        record.finish("failed", f"{type(err).__name__}: {err}")
        raise
    record.finish("success")
    return final


def _finished(record: TrialRecord, config: TrialConfig) -> bool:
    return (record.data.get("status") == "success" and record.data.get("trial_id") == config.trial_id()
            and record.done_epochs() >= set(range(config.train.epochs + 1)))


def _checkpoint_epoch(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return round(state["epoch"])


def _run(config: TrialConfig, record: TrialRecord, report: Report | None, resume_from: Path | None,
         cache_dir: Path | None, progress: bool, distributed: Distributed | None) -> dict[str, float]:
    set_seed(config.seed)
    source = str(record.trial_dir / "config.yaml")
    # a worker of a data-parallel trial has had its GPU set as the current one
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lead = distributed is None or distributed.lead
    progress = progress and lead
    tokenizer = models.load_tokenizer(config.model)
    split = data.load_split(config.data, config.seed, tokenizer, source)
    max_length = config.data.max_length

    scored_members, scored_nonmembers = _scored_samples(config, split)
    scored = scored_members + scored_nonmembers
    scored_ids = scoring.tokenize_texts(tokenizer, [s.text for s in scored], max_length)
    validation_ids = scoring.tokenize_texts(tokenizer, [s.text for s in split.validation], max_length)
    canaries = extraction.make_canaries(config.data.canaries, config.seed) if config.data.canaries else []
    training_texts = split.training_texts() + [c.text for c in canaries for _ in range(c.repeats)]
    train_ids = scoring.tokenize_texts(tokenizer, training_texts, max_length)

    model = models.load_model(config.model, dtype=_dtype(config)).to(device)
    eval_batch = config.eval.batch_on(device.type)
    n_matmul, n_head = flops.matmul_params(model), model.get_output_embeddings().weight.numel()
    reference = None
    if lead and any(attacks.ATTACKS[a.name].needs_reference for a in config.attacks):
        reference = _reference_stats(config, split.split_hash, scored, scored_ids, model, cache_dir, eval_batch)
    model, info = methods.apply_method(model, config.method, source)
    record.update(split_hash=split.split_hash, data_origin=split.origin, method_info=info.__dict__,
                  samples={"members": len(split.members), "nonmembers": len(split.nonmembers),
                           "validation": len(split.validation), "train_texts": len(train_ids),
                           "scored_members": len(scored_members), "scored_nonmembers": len(scored_nonmembers)})
    if progress:
        print(f"[memray] {record.trial_dir.name}: {info.trained}; "
              f"{info.trainable_params:,} of {info.total_params:,} parameters trained", file=sys.stderr)
    zero, replica, deepspeed = None, None, None
    if distributed is not None:
        zero = resolve_zero(config.train.deepspeed, info.total_params)
        deepspeed = deepspeed_config(config.train, zero, distributed.world_size, use_bf16(config.train.precision), info.lr)
        record.update(distributed={"workers": distributed.world_size, "zero": zero.model_dump(mode="json"),
                                   "global_batch_size": deepspeed["train_batch_size"]})
        if lead:
            atomic_write_text(record.trial_dir / DEEPSPEED_FILE, json.dumps(deepspeed, indent=2) + "\n")
        if zero.stage == 3:
            replica = EvalReplica(model, lead)

    is_member = np.array([True] * len(scored_members) + [False] * len(scored_nonmembers))
    copies = np.array([s.copies for s in scored])

    def evaluate(epoch: int, model: torch.nn.Module) -> dict[str, float]:
        if not lead:
            return {"epoch": epoch}  # rank 0 measures; the others only keep in step
        was_training = model.training
        model.eval()  # dropout off for every measurement of this epoch
        score_kwargs = dict(batch_size=eval_batch, vocab_chunk=config.eval.vocab_chunk,
                            virtual_tokens=info.virtual_tokens)
        validation = scoring.score_tokens(model, validation_ids, need_vocab_stats=False, **score_kwargs)
        target = scoring.score_tokens(model, scored_ids, need_vocab_stats=_needs_vocab_stats(config), **score_kwargs)
        val_tokens = sum(len(s.logprobs) for s in validation)
        val_loss = -sum(float(s.logprobs.sum()) for s in validation) / max(val_tokens, 1)
        epoch_metrics: dict[str, float] = {"epoch": epoch, "val/loss": val_loss, "val/ppl": metrics.perplexity(val_loss)}
        scores = attacks.attack_scores(config.attacks, target, [s.text for s in scored], reference)
        for label, values in scores.items():
            epoch_metrics.update(metrics.mia_metrics(label, values, is_member))
            epoch_metrics.update(_duplicate_aucs(label, values, is_member, copies))
            if config.eval.bootstrap:
                low, high = metrics.bootstrap_auc(values, is_member, config.eval.bootstrap, seed=config.seed)
                epoch_metrics[f"mia/{label}/auc_ci95_low"] = low
                epoch_metrics[f"mia/{label}/auc_ci95_high"] = high
        frame = pd.DataFrame({"sample_id": [s.id for s in scored], "member": is_member, "copies": copies})
        for label, values in scores.items():
            frame[label] = values
        write_scores(record.trial_dir, epoch, frame)
        if config.extraction.enabled:
            extracted, rows = extraction.extraction_metrics(
                config.extraction, model, tokenizer,
                [(s.id, ids, s.copies) for s, ids in zip(scored_members, scored_ids)],
                [(s.id, ids, s.copies) for s, ids in zip(scored_nonmembers, scored_ids[len(scored_members):])],
                seed=config.seed)
            epoch_metrics.update(extracted)
            write_table(record.trial_dir, "extraction", epoch, pd.DataFrame(rows))
        if canaries:
            exposed, rows = extraction.canary_metrics(config.data.canaries, model, tokenizer, canaries,
                                                      seed=config.seed, batch_size=eval_batch)
            epoch_metrics.update(exposed)
            write_table(record.trial_dir, "canaries", epoch, pd.DataFrame(rows))
        model.train(was_training)
        return epoch_metrics

    pending: dict[str, Any] = {}
    clock = {"start": time.perf_counter()}
    tokens_per_epoch = sum(len(ids) for ids in train_ids)
    flops_per_token = flops.train_flops_per_token(config.method.name, n_matmul, info.trainable_params, n_head,
                                                  model.config, flops.mean_context(train_ids))
    workers = distributed.world_size if distributed is not None else 1

    def finish_epoch(epoch_metrics: dict[str, float], checkpoint: Path | None) -> None:
        record.add_epoch(epoch_metrics)
        if progress:
            _print_epoch(epoch_metrics, config)
        if report is not None:
            report(dict(epoch_metrics), checkpoint)

    if 0 not in record.done_epochs():
        finish_epoch(evaluate(0, model), None)

    def evaluate_after_training(epoch: int) -> None:
        elapsed = time.perf_counter() - clock["start"]
        if replica is None:
            pending.update(evaluate(epoch, model))
        else:  # ZeRO-3: every rank gathers the weights into rank 0's copy
            pending.update(evaluate(epoch, replica.refresh(model, device)))
            replica.offload()
        pending["perf/train_tokens_per_s"] = tokens_per_epoch / max(elapsed, 1e-9)
        pending["perf/peak_mem_gb"] = _peak_memory_gb()
        utilization = flops.mfu(pending["perf/train_tokens_per_s"], flops_per_token, device, workers)
        if utilization is not None:  # on a GPU whose peak rate is known
            pending["perf/mfu"] = utilization

    def on_epoch_end(end: EpochEnd) -> None:
        epoch_metrics = {**pending, "epoch": end.epoch, "train/loss": end.train_loss}
        pending.clear()
        finish_epoch(epoch_metrics, end.checkpoint_dir)
        clock["start"] = time.perf_counter()

    if config.train.epochs > 0 and (resume_from is None or _checkpoint_epoch(resume_from) < config.train.epochs):
        clock["start"] = time.perf_counter()
        fit(model, tokenizer, train_ids, config.train, lr=info.lr, seed=config.seed,
            checkpoints_dir=record.trial_dir / CHECKPOINTS_DIR, evaluate=evaluate_after_training,
            on_epoch_end=on_epoch_end, resume_from=resume_from, progress=progress, deepspeed=deepspeed,
            gradient_checkpointing=bool(zero and zero.activation_checkpointing))
    return dict(record.epochs[-1])


def _dtype(config: TrialConfig) -> torch.dtype:
    if config.model.dtype == "bfloat16":
        return torch.bfloat16
    return torch.float32  # auto: fp32 master weights; bf16 comes from autocast on GPUs


def _needs_vocab_stats(config: TrialConfig) -> bool:
    return any(attacks.ATTACKS[a.name].needs_vocab_stats for a in config.attacks)


def _scored_samples(config: TrialConfig, split: data.Split) -> tuple[list[data.Sample], list[data.Sample]]:
    """The members and non-members scored every epoch: all, or a seeded subset of eval.max_scored each."""
    cap = config.eval.max_scored
    rng = np.random.default_rng(config.seed)

    def pick(samples: list[data.Sample]) -> list[data.Sample]:
        if cap is None or len(samples) <= cap:
            return list(samples)
        return [samples[i] for i in sorted(rng.choice(len(samples), size=cap, replace=False))]

    return pick(split.members), pick(split.nonmembers)


def _reference_stats(config: TrialConfig, split_hash: str, scored: list[data.Sample], scored_ids: list[list[int]],
                     base_model: torch.nn.Module, cache_dir: Path | None,
                     batch_size: int) -> list[scoring.TokenStats]:
    """Statistics of the base model before fine-tuning, computed once and cached on disk."""
    key = {"model": models.model_identity(config.model), "split_hash": split_hash,
           "max_length": config.data.max_length,
           "samples": hashlib.sha256("\n".join(s.id for s in scored).encode()).hexdigest()}
    stats, _ = scoring.reference_stats(
        key, scored_ids, lambda: base_model, (cache_dir or models.cache_dir()) / "reference",
        batch_size=batch_size, vocab_chunk=config.eval.vocab_chunk, need_vocab_stats=False)
    return stats


def _duplicate_aucs(label: str, scores: np.ndarray, is_member: np.ndarray, copies: np.ndarray) -> dict[str, float]:
    """`mia/<label>/auc@dup<c>`: members with c copies against all non-members."""
    levels = sorted({int(c) for c in copies[is_member]})
    if len(levels) < 2:
        return {}
    nonmember_scores = scores[~is_member]
    out = {}
    for level in levels:
        chosen = scores[is_member & (copies == level)]
        values = np.concatenate([chosen, nonmember_scores])
        labels = np.concatenate([np.ones(len(chosen), bool), np.zeros(len(nonmember_scores), bool)])
        out[f"mia/{label}/auc@dup{level}"] = metrics.roc_auc(values, labels)
    return out


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _print_epoch(epoch_metrics: dict[str, float], config: TrialConfig) -> None:
    parts = []
    for key in (*TABLE_COLUMNS, *(f"mia/{a.label}/auc" for a in config.attacks)):
        value = epoch_metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        name = key.removeprefix("mia/").removesuffix("/auc") + (" auc" if key.startswith("mia/") else "")
        parts.append(f"{name} {value:.4g}" if key != "epoch" else f"epoch {int(value)}")
    print("[memray] " + " | ".join(parts), file=sys.stderr, flush=True)


def summary_table(trial_dir: Path) -> str:
    """The per-epoch table of a trial folder: epoch, losses, perplexity, each attack's AUC."""
    from memray.results import read_result

    result = read_result(trial_dir) or {}
    rows = result.get("epochs", [])
    attack_labels = [key.split("/")[1] for key in (rows[-1] if rows else {}) if key.startswith("mia/") and key.endswith("/auc")]
    columns = ["epoch", "train/loss", "val/loss", "val/ppl", *(f"mia/{label}/auc" for label in attack_labels)]
    header = ["epoch", "train loss", "val loss", "val ppl", *(f"{label} AUC" for label in attack_labels)]
    lines = [header]
    for row in rows:
        line = []
        for key in columns:
            value = row.get(key)
            if key == "epoch":
                line.append(str(int(value)))
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                line.append("-")
            else:
                line.append(f"{value:.4f}" if "auc" in key else f"{value:.3f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    status = result.get("status", "unknown")
    reason = f" ({result['reason']})" if result.get("reason") else ""
    return "\n".join([f"{Path(trial_dir)}: {status}{reason}", *text])
