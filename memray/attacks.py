"""Membership-inference attacks: a score per sample from the statistics of `memray.scoring`.

Every attack returns a score where higher means "more likely a member" (members are the
positive class of the AUC). Attacks read only precomputed `TokenStats`, so they cost no
model call. Each one is a function registered with `@attack(name, ...)`, which also says
what it needs (a reference model's statistics, the vocabulary statistics) and whether it
takes a `k`; its config entry (`AttackConfig`, assembled into the trial schema by `memray.config`) and the trial take their
names and needs from `ATTACKS`, with no special case per attack. This module imports no
torch, so the config can be validated before anything heavy loads.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field, field_validator, model_validator

from memray import reference_attacks
from memray.reference_attacks import ReferenceScorer
from memray.reference_attacks import MIN_REFERENCES
from memray.registry import Registry, load_entry_points
from memray.schema import Schema

if TYPE_CHECKING:
    from memray.scoring import TokenStats

#: (attack config, target statistics, text, reference statistics or None) -> score
AttackFn = Callable[["AttackConfig", "TokenStats", str, "TokenStats | None"], float]


@dataclass(frozen=True)
class AttackSpec:
    """An attack and what it needs."""

    name: str
    score: AttackFn
    default_k: float | None = None  # the attack takes a share k of tokens; None: it takes no k
    needs_reference: bool = False  # reads the reference model's statistics
    needs_vocab_stats: bool = False  # reads the vocabulary mean / std of log-probs per position
    # scored from reference models trained on halves of the audit pool (memray.references),
    # not from one sample's statistics (`score` is then never called): label suffix -> its
    # scorer, e.g. {"": online, "-offline": offline}, one metric label `<name><suffix>` each
    reference_scorers: Mapping[str, ReferenceScorer] = field(default_factory=dict)
    # run by a trial whose config has no `attacks` list; an attack registered later is not
    # (existing configs keep their trial ids, and `memray resume` does not re-run them)
    default: bool = False

    @property
    def needs_reference_models(self) -> bool:
        return bool(self.reference_scorers)


ATTACKS: Registry[AttackSpec] = Registry("attack")


class AttackConfig(Schema):
    name: str  # a registered attack (memray.attacks.ATTACKS)
    k: float | None = Field(None, gt=0, le=1)  # mink / mink++: share of lowest-scoring tokens
    references: int | None = None  # lira / rmia: reference models trained on halves of the audit pool (even, >= 4)

    @field_validator("name")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        if name not in ATTACKS:
            raise ValueError(f"{name!r} is not one of {', '.join(ATTACKS)}")
        return name

    @field_validator("references")
    @classmethod
    def _enough_references(cls, references: int | None) -> int | None:
        if references is not None and (references < MIN_REFERENCES or references % 2):
            raise ValueError(f"lira and rmia need an even number of at least {MIN_REFERENCES} reference models "
                             f"(each audit sample in exactly half: two in and two out), not {references}")
        return references

    @model_validator(mode="after")
    def _k(self) -> "AttackConfig":
        default_k = ATTACKS[self.name].default_k
        if self.k is not None and default_k is None:
            takes_k = [name for name in ATTACKS if ATTACKS[name].default_k is not None]
            raise ValueError(f"k is only used by {' and '.join(takes_k)}, not {self.name}")
        if self.k is None and default_k is not None:
            self.k = default_k
        calibrated = ATTACKS[self.name].needs_reference_models
        if self.references is not None and not calibrated:
            takes = [name for name in ATTACKS if ATTACKS[name].needs_reference_models]
            raise ValueError(f"references is only used by {' and '.join(takes)}, not {self.name}")
        return self

    @property
    def label(self) -> str:
        """Name used in metric keys: `mink`, or `mink@0.1` when k is not the attack's default."""
        if self.k is None or self.k == ATTACKS[self.name].default_k:
            return self.name
        return f"{self.name}@{self.k:g}"

    @property
    def labels(self) -> list[str]:
        """The labels of the metrics the attack fills: one per reference scorer of an attack
        scored from reference models (label suffixes of its registry entry), else its label."""
        scorers = ATTACKS[self.name].reference_scorers
        return [self.label + suffix for suffix in scorers] if scorers else [self.label]


def attack(name: str, default_k: float | None = None, needs_reference: bool = False,
           needs_vocab_stats: bool = False, reference_scorers: Mapping[str, ReferenceScorer] | None = None,
           default: bool = False) -> Callable[[AttackFn], AttackFn]:
    """Register an attack under the name the config uses; ValueError if the name is taken."""

    def register(function: AttackFn) -> AttackFn:
        ATTACKS.add(name, AttackSpec(name, function, default_k, needs_reference, needs_vocab_stats,
                                     dict(reference_scorers or {}), default))
        return function

    return register


def default_attacks() -> tuple[str, ...]:
    """The attacks of a config without an `attacks` list (`AttackSpec.default`)."""
    return tuple(name for name in ATTACKS if ATTACKS[name].default)


def attack_scores(
    attacks: list[AttackConfig],
    target: list[TokenStats],
    texts: list[str],
    reference: list[TokenStats] | None,
) -> dict[str, np.ndarray]:
    """Scores of every attack: label (`AttackConfig.label`) -> float64 array, one per sample.
    Attacks scored from reference models (lira, rmia) are left out: `memray.references`
    adds them once the references are trained.

    target: the fine-tuned model's statistics per sample; texts: the samples' texts (zlib);
    reference: the reference model's statistics for the same samples, or None when no
    listed attack needs them (`ref` does).
    """
    if len(texts) != len(target) or (reference is not None and len(reference) != len(target)):
        raise ValueError(
            f"one entry per sample is needed: {len(target)} target statistics, {len(texts)} texts, "
            f"{'no' if reference is None else len(reference)} reference statistics"
        )
    refs = reference if reference is not None else [None] * len(target)
    scores: dict[str, np.ndarray] = {}
    for config in attacks:
        if ATTACKS[config.name].needs_reference_models:
            continue
        function = ATTACKS[config.name].score
        scores[config.label] = np.array(
            [function(config, stats, text, ref) for stats, text, ref in zip(target, texts, refs)],
            dtype=np.float64,
        )
    return scores


#: The papers' rules memray follows where an attack leaves a choice; recorded in every
#: result.json (`attack_rules`) and part of every trial id (`memray.config.TrialConfig.trial_id`),
#: so that trials measured under other rules are never mixed with these on resume.
ATTACK_RULES: dict[str, str] = {
    "mink_tokens": "int(k * n) lowest tokens, at least 1 (Shi et al. 2024's code, MIMIR)",
    "zlib_text": "the scored text: the tokens scored, decoded (a truncated sample's kept part)",
    "blocks": "max_length tokens including BOS, so every token of a block is trained on and scored",
}


def lowest_mean(values: np.ndarray, k: float) -> float:
    """Mean of the int(k * n) lowest values, at least one (the rule of Shi et al. 2024's
    code and MIMIR: `int(len(x) * k)` truncates, so 0.2 of 9 tokens is 1 token)."""
    count = max(1, int(k * len(values)))
    return float(np.mean(np.sort(values.astype(np.float64))[:count]))


@attack("loss", default=True)
def loss_score(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    """LOSS: the negative mean token loss; members are fitted better.

    Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine Learning: Analyzing
    the Connection to Overfitting", https://arxiv.org/abs/1709.01604
    """
    return -target.loss


@attack("ref", needs_reference=True, default=True)
def reference_score(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    """Ref: how much lower the target's loss is than the reference model's (the base model
    before fine-tuning), which removes how easy the text is in itself.

    Carlini et al. 2021, "Extracting Training Data from Large Language Models",
    https://arxiv.org/abs/2012.07805; Mireshghallah et al. 2022, "Quantifying Privacy Risks
    of Masked Language Models Using Membership Inference Attacks",
    https://arxiv.org/abs/2203.03929
    """
    if reference is None:
        raise ValueError(
            "attack 'ref' needs the reference model's statistics (memray.scoring.reference_stats); none were given"
        )
    return reference.loss - target.loss


@attack("zlib", default=True)
def zlib_score(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    """Zlib: the model's log-perplexity over the text's zlib entropy (compressed length in
    bytes), negated; a member has a low loss for how compressible it is. `text` is the text
    that was scored (`memray.scoring.scored_texts`), so both cover the same tokens.

    Carlini et al. 2021, "Extracting Training Data from Large Language Models",
    https://arxiv.org/abs/2012.07805
    """
    return -target.loss / len(zlib.compress(text.encode("utf-8")))


@attack("mink", default_k=0.2, default=True)  # Shi et al. 2024 report k=20% as a robust default
def min_k_score(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    """Min-K% Prob: the mean log-probability of the k fraction of least likely tokens; a
    non-member has more outlier tokens with very low probability.

    Shi et al. 2024, "Detecting Pretraining Data from Large Language Models",
    https://arxiv.org/abs/2310.16789
    """
    return lowest_mean(target.logprobs, config.k)


@attack("mink++", default_k=0.2, needs_vocab_stats=True, default=True)
def min_k_plus_plus_score(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    """Min-K%++: each token's log-probability standardized by the mean and standard
    deviation of the log-probability over the vocabulary at that position, then the mean
    of the k fraction of lowest; members sit near local maxima of the likelihood.

    Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training Data from
    Large Language Models", https://arxiv.org/abs/2404.02936
    """
    if target.mu is None or target.sigma is None:
        raise ValueError("attack 'mink++' needs vocabulary statistics: score with need_vocab_stats=True")
    # sigma is 0 only for a one-hot distribution, where logprob == mu: the token scores 0
    sigma = np.maximum(target.sigma.astype(np.float64), 1e-6)
    standardized = (target.logprobs.astype(np.float64) - target.mu) / sigma
    return lowest_mean(standardized, config.k)


def _from_reference_models(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    raise ValueError(f"attack {config.name!r} is scored from reference models (memray.references), not per sample")


# LiRA and RMIA: their scores come from reference models trained like the target
# (`references` of AttackConfig), each metric label from its own scorer of
# memray.reference_attacks once the references are trained; registered here so that configs,
# the schema and the CLI know them like every other attack
attack("lira", reference_scorers={"": reference_attacks.lira_score,
                                  "-offline": reference_attacks.lira_offline_score})(_from_reference_models)
attack("rmia", reference_scorers={"": reference_attacks.rmia_score,
                                  "-offline": reference_attacks.rmia_offline_score})(_from_reference_models)

# units of installed packages (`memray.attacks` entry points), after memray's own
load_entry_points("memray.attacks")
