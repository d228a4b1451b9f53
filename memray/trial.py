"""One trial end to end: data -> model -> method -> training -> per-epoch memorization.

`run_trial` is a plain function: it takes a resolved `TrialConfig` and a `report`
callable and returns the last epoch's metrics. It knows nothing of Ray: the sweep passes
a `report` that forwards to Ray Tune, `memray trial` passes one that prints.

Every epoch (epoch 0 = before training) it measures validation loss / perplexity and
the membership-inference attacks on the same scored members and non-members, writes the
per-sample scores, appends the metrics to `result.json`, and reports them together with
the epoch's checkpoint folder. A trial that raises is marked `failed` with its reason, or
`interrupted` (KeyboardInterrupt, SystemExit).

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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from transformers import set_seed

from memray import attacks, data, dp, extraction, flops, methods, metrics, models, privacy, reference_attacks, scoring
from memray.config import ConfigError, ReferenceConfig, TrialConfig
from memray.distributed import DEEPSPEED_FILE, Distributed, EvalReplica, deepspeed_config, resolve_zero
from memray.metric_keys import auc_labels, mia_key, parse_mia_key
from memray.results import CHECKPOINTS_DIR, TrialRecord, atomic_write_text, ending_state, write_scores, write_table
from memray.train import EpochEnd, fit, saved_checkpoints, use_bf16

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
    new_folder = not trial_dir.exists()
    record = TrialRecord.open(trial_dir) if resume else TrialRecord(trial_dir / "result.json")
    finished = resume and _finished(record, config)
    checkpoints_dir = trial_dir / CHECKPOINTS_DIR
    resume_from = _recorded_checkpoint(record, checkpoints_dir, distributed) if resume and not finished else None
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
        trial = TrialRun(config, record, report, Path(cache_dir) if cache_dir else None, progress, distributed)
        final = trial.run(resume_from)
    except ConfigError as err:
        if new_folder and not record.epochs and not record.readonly:  # bad input found while setting up: leave nothing behind
            shutil.rmtree(trial_dir, ignore_errors=True)
        else:
            record.finish("failed", f"ConfigError: {err}")
        raise
    except BaseException as err:  # KeyboardInterrupt too: the record must say why it stopped
        state = ending_state(err)
        record.finish(state, f"{type(err).__name__}: {err}" if state == "failed"
                      else f"stopped by Ctrl-C or SIGTERM ({type(err).__name__})")
        raise
    record.finish("success")
    return final


def _finished(record: TrialRecord, config: TrialConfig) -> bool:
    return (record.data.get("status") == "success" and record.data.get("trial_id") == config.trial_id()
            and record.done_epochs() >= set(range(config.train.epochs + 1)))


def _recorded_checkpoint(record: TrialRecord, checkpoints_dir: Path, distributed: Distributed | None) -> Path | None:
    """The newest checkpoint whose epoch result.json records. A process killed after the
    Trainer wrote an epoch's checkpoint but before memray recorded the epoch leaves a newer
    one: that epoch was never measured, so it is trained again from the checkpoint before
    it (or from the start, when the Trainer already removed that one), and the unrecorded
    checkpoints are removed (by rank 0 of a multi-worker trial)."""
    recorded = record.done_epochs()
    found = saved_checkpoints(checkpoints_dir)
    while found and _checkpoint_epoch(found[-1]) not in recorded:
        stale = found.pop()
        if distributed is None or distributed.lead:
            shutil.rmtree(stale, ignore_errors=True)
    return found[-1] if found else None


def _checkpoint_epoch(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return round(state["epoch"])


@dataclass
class EpochMeasurement:
    """What evaluating the model once measured: the epoch's metrics and the per-sample rows
    to write beside them (attack scores; extraction and canary rows when enabled)."""

    metrics: dict[str, float]
    scores: pd.DataFrame | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


class TrialRun:
    """One trial, set up once (data, model, method, reference statistics), then driven
    epoch by epoch: `measure` evaluates the model and writes nothing; `write` puts an
    epoch's per-sample rows in the trial folder; `record` appends its metrics to
    result.json, prints them and reports them.

    The Trainer's epoch end reaches it in a fixed order (`memray.train.fit` checks it):
    `after_training_epoch(epoch)` first, on the weights still in memory, then
    `epoch_saved(end)` once the epoch's checkpoint (if any) is written, which records what
    was measured together with the epoch's training loss and reports it with the checkpoint.
    """

    def __init__(self, config: TrialConfig, record: TrialRecord, report: Report | None, cache_dir: Path | None,
                 progress: bool, distributed: Distributed | None):
        # a reference model of lira / rmia has a seed of its own for initialization and data
        # order; its split and audit pool stay keyed on the target's (config.seed)
        self.train_seed = config.reference.seed if config.reference is not None else config.seed
        set_seed(self.train_seed)
        self.config, self.record, self.report, self.distributed = config, record, report, distributed
        source = str(record.trial_dir / "config.yaml")
        # a worker of a data-parallel trial has had its GPU set as the current one
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.lead = distributed is None or distributed.lead  # rank 0 measures and writes; the others keep in step
        self.progress = progress and self.lead
        self.tokenizer = models.load_tokenizer(config.model)
        split = data.load_split(config.data, config.seed, self.tokenizer, source)
        max_length = config.data.max_length

        self.scored_members, self.scored_nonmembers = _scored_samples(config, split)
        self.canaries = extraction.make_canaries(config.data.canaries, config.seed) if config.data.canaries else []
        reference_data = None
        texts = len(split.training_texts()) + sum(c.repeats for c in self.canaries)  # the target's
        # read once for the references' top-ups (up to `texts` each) and DC-PDD's frequencies
        spare = _SpareSamples(config, self.tokenizer, source, max(texts, FREQUENCY_SAMPLES))
        if config.reference_models() or config.reference is not None:
            # every reference's data, so that a dataset too small for them is found before training
            pool = self.scored_members + self.scored_nonmembers
            found = [data.reference_split(split, pool, reference_attacks.half_masks(len(pool), reference.of, config.seed)
                                          [reference.index], texts, reference.seed, spare, source)
                     for reference in _reference_sections(config)]
            if config.reference is not None:  # a reference model: its half of the pool, topped up
                reference_data = found[0]
                split = reference_data.split
                self.scored_members = split.members[:reference_data.pool_in]
                self.scored_nonmembers = split.nonmembers  # the other half: the whole pool is scored
                self.canaries = []  # the target's secrets: a reference trains on ordinary texts in their place
        self.scored = self.scored_members + self.scored_nonmembers
        self.scored_ids = scoring.tokenize_texts(self.tokenizer, [s.text for s in self.scored], max_length)
        self.scored_texts = scoring.scored_texts(self.tokenizer, self.scored_ids)  # zlib's text: what was scored
        self.validation_ids = scoring.tokenize_texts(self.tokenizer, [s.text for s in split.validation], max_length)
        training_texts = split.training_texts() + [c.text for c in self.canaries for _ in range(c.repeats)]
        self.train_ids = scoring.tokenize_texts(self.tokenizer, training_texts, max_length)
        self.is_member = np.array([True] * len(self.scored_members) + [False] * len(self.scored_nonmembers))
        self.copies = np.array([s.copies for s in self.scored])

        model = models.load_model(config.model, dtype=_dtype(config)).to(self.device)
        self.eval_batch = config.eval.batch_on(self.device.type)
        n_matmul, n_head = flops.matmul_params(model), model.get_output_embeddings().weight.numel()
        self.reference = None
        if self.lead and any(attacks.ATTACKS[a.name].needs_reference for a in config.attacks):
            self.reference = _reference_stats(config, split.split_hash, self.scored, self.scored_ids, model, cache_dir,
                                              self.eval_batch)
        self.model, self.info = methods.apply_method(model, config.method, source)
        self.prepared = attacks.prepare_attacks(config.attacks, attacks.AttackSetup(
            token_ids=lambda texts, length: scoring.tokenize_texts(self.tokenizer, texts, length),
            bos=self.tokenizer.bos_token_id, validation_ids=self.validation_ids,
            context_length=_context_length(model), max_length=max_length,
            vocab_size=max(len(self.tokenizer), model.get_output_embeddings().weight.shape[0]),
            frequency_texts=_frequency_texts(config, spare), source=source,
            virtual_tokens=self.info.virtual_tokens))
        audit = data.split_audit(split.members, self.scored_nonmembers, split.overlap_filter)
        record.update(split_audit=audit)
        self.split_metrics = {key: audit[f"{n}gram"]["mean"] for n, key in metrics.SPLIT_OVERLAP_METRICS.items()
                              if f"{n}gram" in audit}
        record.update(split_hash=split.split_hash, data_origin=split.origin, model_origin=models.model_origin(config.model),
                      method_info=self.info.__dict__,
                      attack_rules=_attack_rules(config, len(self.scored_nonmembers), self.prepared),
                      samples={"members": len(split.members), "nonmembers": len(split.nonmembers),
                               "validation": len(split.validation), "train_texts": len(self.train_ids),
                               "scored_members": len(self.scored_members),
                               "scored_nonmembers": len(self.scored_nonmembers)})
        if reference_data is not None:
            record.update(reference_data={**reference_data.composition, "seed": self.train_seed,
                                          "target_seed": config.seed, "canaries": CANARY_RULE})
        if self.progress:
            print(f"[memray] {record.trial_dir.name}: {self.info.trained}; "
                  f"{self.info.trainable_params:,} of {self.info.total_params:,} parameters trained", file=sys.stderr)
        self.zero, self.replica, self.deepspeed = None, None, None
        if distributed is not None:
            self.zero = resolve_zero(config.train.deepspeed, self.info.total_params)
            self.deepspeed = deepspeed_config(config.train, self.zero, distributed.world_size,
                                              use_bf16(config.train.precision), self.info.lr)
            record.update(distributed={"workers": distributed.world_size, "zero": self.zero.model_dump(mode="json"),
                                       "global_batch_size": self.deepspeed["train_batch_size"]})
            if self.lead:
                atomic_write_text(record.trial_dir / DEEPSPEED_FILE, json.dumps(self.deepspeed, indent=2) + "\n")
            if self.zero.stage == 3:
                self.replica = EvalReplica(self.model, self.lead)
        self.dp_plan = None
        if config.train.dp is not None:
            if distributed is not None:
                raise ConfigError(source, "train.dp", "DP-SGD runs in one process: per-sample clipping does not "
                                                      "run under DeepSpeed ZeRO, and a multi-worker trial is one")
            self.dp_plan = dp.calibrate(config.train.dp, len(self.train_ids), config.train.batch_size, config.train.epochs,
                                        methods.dp_gradients(config.method))
            record.update(dp=self.dp_plan.record())
        # the delta the empirical epsilon tests: the trial's own under DP, else the default rule's
        self.audit_delta = self.dp_plan.delta if self.dp_plan else privacy.default_delta(len(self.train_ids))
        record.update(privacy_audit={"method": privacy.audit_rule(), "confidence": privacy.AUDIT_LEVEL,
                                     "delta": self.audit_delta,
                                     **({"canaries": privacy.canary_audit_rule()} if self.canaries else {})})
        self.tokens_per_epoch = sum(len(ids) for ids in self.train_ids)
        self.flops_per_token = flops.train_flops_per_token(methods.METHODS[config.method.name].flop_class, n_matmul,
                                                           self.info.trainable_params, n_head, self.model.config,
                                                           flops.mean_context(self.train_ids))
        self.workers = distributed.world_size if distributed is not None else 1
        self.epoch_started = time.perf_counter()
        self.measured: EpochMeasurement | None = None  # the epoch after_training_epoch measured, not yet recorded

    # -- measuring (no files) -------------------------------------------------------------

    def measure(self, epoch: int, model: torch.nn.Module) -> EpochMeasurement:
        """Evaluate `model` (eval mode, restored after): validation loss and perplexity,
        every attack's scores and metrics, extraction and canary exposure when enabled.
        On a rank other than 0, only the epoch number."""
        if not self.lead:
            return EpochMeasurement({"epoch": epoch})
        config = self.config
        was_training = model.training
        model.eval()  # dropout off for every measurement of this epoch
        score_kwargs = dict(batch_size=self.eval_batch, vocab_chunk=config.eval.vocab_chunk,
                            virtual_tokens=self.info.virtual_tokens)
        validation = scoring.score_tokens(model, self.validation_ids, need_vocab_stats=False, **score_kwargs)
        target = scoring.score_tokens(model, self.scored_ids, need_vocab_stats=_needs_vocab_stats(config), **score_kwargs)
        val_tokens = sum(len(s.logprobs) for s in validation)
        val_loss = -sum(float(s.logprobs.sum()) for s in validation) / max(val_tokens, 1)
        found: dict[str, float] = {"epoch": epoch, "val/loss": val_loss, "val/ppl": metrics.perplexity(val_loss),
                                   **self.split_metrics}
        context = attacks.AttackContext(
            self.scored_ids, self.scored_texts, target, self.reference, model=model,
            score=lambda token_ids: scoring.score_tokens(model, token_ids, need_vocab_stats=False, **score_kwargs),
            virtual_tokens=self.info.virtual_tokens, prepared=self.prepared,
            validation_ids=self.validation_ids, validation=validation)
        scores = attacks.attack_scores(config.attacks, target, self.scored_texts, self.reference, context)
        # nll: each sample's mean token loss, the statistic of lira / rmia (memray.references)
        frame = pd.DataFrame({"sample_id": [s.id for s in self.scored], "member": self.is_member, "copies": self.copies,
                              "nll": [s.loss for s in target]})
        for label, values in scores.items():
            found.update(metrics.mia_metrics(label, values, self.is_member, config.eval.bootstrap, config.seed))
            found.update(_duplicate_aucs(label, values, self.is_member, self.copies))
            frame[label] = values
        found.update(self._epsilon_bound(scores))
        if self.dp_plan is not None and epoch == 0:
            found["privacy/epsilon"] = 0.0  # before training nothing is spent
        measurement = EpochMeasurement(found, frame)
        if config.extraction.enabled:
            members = [(s.id, ids, s.copies) for s, ids in zip(self.scored_members, self.scored_ids)]
            nonmembers = [(s.id, ids, s.copies)
                          for s, ids in zip(self.scored_nonmembers, self.scored_ids[len(self.scored_members):])]
            extracted, rows = extraction.extraction_metrics(config.extraction, model, self.tokenizer, members,
                                                            nonmembers, seed=config.seed)
            found.update(extracted)
            measurement.tables["extraction"] = pd.DataFrame(rows)
        if self.canaries:
            exposed, rows = extraction.canary_metrics(config.data.canaries, model, self.tokenizer, self.canaries,
                                                      seed=config.seed, batch_size=self.eval_batch)
            found.update(exposed)
            found.update(_canary_epsilon_bound(rows, self.audit_delta))
            measurement.tables["canaries"] = pd.DataFrame(rows)
        model.train(was_training)
        return measurement

    def _epsilon_bound(self, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """`privacy/epsilon_lb` and its ceiling, from the attacks' scores of the records trained
        on at most once (`memray.privacy.epsilon_lower_bound`)."""
        single = self.copies <= 1
        bound = privacy.epsilon_lower_bound({label: np.asarray(values)[single] for label, values in scores.items()},
                                            self.is_member[single], self.audit_delta)
        return {"privacy/epsilon_lb": bound.epsilon_lb, "privacy/epsilon_lb_ceiling": bound.ceiling}

    # -- writing ----------------------------------------------------------------------------

    def write(self, epoch: int, measurement: EpochMeasurement) -> None:
        """The epoch's per-sample rows into the trial folder (rank 0 only)."""
        if not self.lead:
            return
        if measurement.scores is not None:
            write_scores(self.record.trial_dir, epoch, measurement.scores)
        for name, rows in measurement.tables.items():
            write_table(self.record.trial_dir, name, epoch, rows)

    def record_epoch(self, epoch_metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Append the epoch to result.json, print it, and report it with its checkpoint."""
        self.record.add_epoch(epoch_metrics)
        if self.progress:
            print(f"[memray] {epoch_line(epoch_metrics, self.config)}", file=sys.stderr, flush=True)
        if self.report is not None:
            self.report(dict(epoch_metrics), checkpoint)

    # -- the Trainer's epoch end, in its order ------------------------------------------------

    def after_training_epoch(self, epoch: int) -> None:
        """First at an epoch's end: measure the trained weights (on ZeRO-3, gathered into
        rank 0's replica) and the epoch's speed and memory; nothing is written yet."""
        elapsed = time.perf_counter() - self.epoch_started
        if self.replica is None:
            measurement = self.measure(epoch, self.model)
        else:  # ZeRO-3: every rank gathers the weights into rank 0's copy
            measurement = self.measure(epoch, self.replica.refresh(self.model, self.device))
            self.replica.offload()
        speed = self.tokens_per_epoch / max(elapsed, 1e-9)
        measurement.metrics.update({"perf/train_tokens_per_s": speed, "perf/peak_mem_gb": _peak_memory_gb()})
        utilization = flops.mfu(speed, self.flops_per_token, self.device, self.workers)
        if utilization is not None:  # on a GPU whose peak rate is known
            measurement.metrics["perf/mfu"] = utilization
        self.measured = measurement

    def epoch_saved(self, end: EpochEnd) -> None:
        """Second: the epoch's checkpoint exists (or none is kept); write what
        after_training_epoch measured, record it with the training loss, report it."""
        measurement, self.measured = self.measured, None
        if measurement is None or measurement.metrics["epoch"] != end.epoch:
            raise RuntimeError(f"epoch {end.epoch} ended without being measured first: the Trainer called "
                               "its callbacks out of the order memray.train.fit relies on")
        self.write(end.epoch, measurement)
        self.record_epoch({**measurement.metrics, **end.metrics, "epoch": end.epoch, "train/loss": end.train_loss},
                          end.checkpoint_dir)
        self.epoch_started = time.perf_counter()

    def run(self, resume_from: Path | None) -> dict[str, float]:
        """Epoch 0 (before training) unless recorded, then training from `resume_from` (or
        the start) with every epoch measured, written and reported; the last epoch's metrics."""
        if 0 not in self.record.done_epochs():
            measurement = self.measure(0, self.model)
            self.write(0, measurement)
            self.record_epoch(measurement.metrics, None)
        epochs = self.config.train.epochs
        if epochs > 0 and (resume_from is None or _checkpoint_epoch(resume_from) < epochs):
            self.epoch_started = time.perf_counter()
            if self.dp_plan is not None:  # DP-SGD: memray's own loop (Poisson sampling, per-sample clipping, noise)
                dp.fit_dp(self.model, self.tokenizer, self.train_ids, self.config.train, self.dp_plan, lr=self.info.lr,
                          seed=self.train_seed, checkpoints_dir=self.record.trial_dir / CHECKPOINTS_DIR,
                          evaluate=self.after_training_epoch, on_epoch_end=self.epoch_saved, resume_from=resume_from)
            else:
                fit(self.model, self.tokenizer, self.train_ids, self.config.train, lr=self.info.lr, seed=self.train_seed,
                    checkpoints_dir=self.record.trial_dir / CHECKPOINTS_DIR, evaluate=self.after_training_epoch,
                    on_epoch_end=self.epoch_saved, resume_from=resume_from, progress=self.progress,
                    deepspeed=self.deepspeed,
                    gradient_checkpointing=bool(self.zero and self.zero.activation_checkpointing))
        return dict(self.record.epochs[-1])


#: How canaries (data.canaries) meet the reference models of lira / rmia, recorded in each
#: reference's result.json: they are the target's secrets, inserted by the auditor and
#: measured by their exposure on the target; a reference stands for a model trained on the
#: same distribution without them, so it counts their copies in its training-set size and
#: trains on ordinary samples in their place.
CANARY_RULE = "not trained on: their copies counted in the training-set size, filled with ordinary samples"


def _reference_sections(config: TrialConfig) -> list[ReferenceConfig]:
    """The `reference` sections whose data this trial builds: its own (a reference model),
    or those of every reference model its attacks need (a target)."""
    return [config.reference] if config.reference is not None else config.reference_sections()


#: Dataset samples outside members, non-members and validation that DC-PDD's token
#: frequencies are counted on where the model's pretraining text is not at hand.
FREQUENCY_SAMPLES = 2000


class _SpareSamples:
    """The dataset's spare samples (`data.spare_samples`) for one trial's set-up: its
    references' top-ups and DC-PDD's token frequencies. Each read builds the dataset's pool
    again to walk past the split (seconds on wikitext2), so the first read takes as many as
    any of them can ask for (`most`) and later asks are slices of it; one that asks for more
    than was read reads again (only if the pool held more)."""

    def __init__(self, config: TrialConfig, tokenizer: Any, source: str, most: int):
        self.config, self.tokenizer, self.source, self.most = config, tokenizer, source, most
        self.read: list[data.Sample] | None = None
        self.asked = 0  # how many the last read asked for

    def __call__(self, count: int) -> list[data.Sample]:
        short = self.read is not None and len(self.read) < self.asked  # the pool ran out: all there is
        if self.read is None or (count > len(self.read) and not short):
            self.asked = max(count, self.most)
            self.read = data.spare_samples(self.config.data, self.config.seed, self.tokenizer, self.asked, self.source)
        return self.read[:count]


def _frequency_texts(config: TrialConfig, spare: Callable[[int], list[data.Sample]]
                     ) -> Callable[[], tuple[str, list[str]]]:
    """`frequency_texts` of `memray.attacks.AttackSetup`: the base model's pretraining text
    where memray has it (`memray.models.pretraining_texts`), else up to FREQUENCY_SAMPLES
    of the dataset's spare samples (outside members, non-members and validation)."""

    def read() -> tuple[str, list[str]]:
        pretraining = models.pretraining_texts(config.model)
        if pretraining is not None:
            return pretraining
        return (f"{config.data.dataset} samples outside members, non-members and validation",
                [sample.text for sample in spare(FREQUENCY_SAMPLES)])

    return read


def _context_length(model: torch.nn.Module) -> int:
    """Positions the model takes: its config's max_position_embeddings (n_positions for GPT-2)."""
    text_config = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(text_config, key, None):
            return int(getattr(text_config, key))
    raise ValueError(f"{type(model).__name__}'s config gives no context length (max_position_embeddings)")


def _attack_rules(config: TrialConfig, nonmembers: int,
                  prepared: dict[str, attacks.Prepared] | None = None) -> dict[str, Any]:
    """What result.json records of how the attacks were measured: the papers' rules (and
    what each attack's set-up found), the AUC interval, and the TPRs at FPRs the scored
    non-members cannot resolve (left out)."""
    interval = (f"percentile bootstrap, {config.eval.bootstrap} stratified resamples" if config.eval.bootstrap
                else "DeLong (normal approximation of the AUC's variance)")
    return {**attacks.attack_rules(config.attacks, prepared), "auc_interval": f"95%, {interval}",
            "tpr_unresolved": metrics.unresolved_fprs(nonmembers)}


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
        out[mia_key(label, f"auc@dup{level}")] = metrics.roc_auc(values, labels)
    return out


def _canary_epsilon_bound(rows: list[dict[str, Any]], delta: float) -> dict[str, float]:
    """`privacy/epsilon_lb_canary` and its ceiling: the one-run audit on the canaries inserted
    once and the never-inserted ones (canaries with several copies left out: group privacy);
    nothing when either kind is missing (data.canaries.repeats without 1, or no heldout)."""
    chosen = [row for row in rows if row["repeats"] <= 1]
    inserted = np.array([row["repeats"] == 1 for row in chosen], dtype=bool)
    if not inserted.any() or inserted.all():
        return {}
    bound, ceiling = privacy.canary_epsilon_lower_bound(np.array([row["exposure"] for row in chosen]), inserted, delta)
    return {"privacy/epsilon_lb_canary": bound, "privacy/epsilon_lb_canary_ceiling": ceiling}


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def epoch_line(epoch_metrics: dict[str, float], config: TrialConfig) -> str:
    """One epoch in one line: epoch, training loss, validation perplexity, each attack's AUC."""
    parts = []
    for key in (*TABLE_COLUMNS, *(mia_key(a.label) for a in config.attacks)):
        value = epoch_metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        parsed = parse_mia_key(key)
        name = f"{parsed[0]} auc" if parsed else key
        parts.append(f"{name} {value:.4g}" if key != "epoch" else f"epoch {int(value)}")
    flag = metrics.below_chance_note(epoch_metrics)
    return " | ".join(parts + ([flag] if flag else []))


def summary_table(trial_dir: Path) -> str:
    """The per-epoch table of a trial folder: epoch, losses, perplexity, each attack's AUC
    (marked * where its interval holds 0.5)."""
    from memray.results import read_result

    result = read_result(trial_dir) or {}
    rows = result.get("epochs", [])
    attack_labels = auc_labels(rows[-1] if rows else {})
    columns = ["epoch", "train/loss", "val/loss", "val/ppl", *(mia_key(label) for label in attack_labels)]
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
            elif key.endswith("/auc"):
                low, high = row.get(key + "_lo"), row.get(key + "_hi")
                chance = low is not None and high is not None and low <= 0.5 <= high
                below = high is not None and high < 0.5
                line.append(f"{value:.4f}" + ("*" if chance else "!" if below else " "))
            else:
                line.append(f"{value:.3f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    status = result.get("status", "unknown")
    reason = f" ({result['reason']})" if result.get("reason") else ""
    text.append("* the AUC's 95% interval holds 0.5: not distinguishable from chance")
    if any(metrics.below_chance(row) for row in rows):
        audit = result.get("split_audit") or {}
        overlap = ", ".join(f"{key} overlap mean {value['mean']:.3f}, max {value['max']:.3f}"
                            for key, value in audit.items() if key.endswith("gram"))
        text.append("! the AUC's 95% interval lies below 0.5: members score lower than non-members, which points at "
                    f"the split, not training (split_audit: {overlap or 'not recorded'})")
    return "\n".join([f"{Path(trial_dir)}: {status}{reason}", *text])
