"""Membership-inference attacks: a score per sample from the statistics of `memray.scoring`,
or from a pass of their own over the model.

Every attack returns a score where higher means "more likely a member" (members are the
positive class of the AUC). Most attacks read only precomputed `TokenStats`, so they cost
no model call: each is a function registered with `@attack(name, ...)`, which also says
what it needs (a reference model's statistics, the vocabulary statistics) and whether it
takes a `k`. An attack that needs more (token ids, a frequency table, a prefix, the
model's gradients) registers a `score_set` over all samples at once, reading an
`AttackContext`, and a `prepare` that builds its set-up once per trial from an
`AttackSetup` (ReCaLL's shots, DC-PDD's token frequencies); its registry entry also
holds its rules (recorded in result.json's `attack_rules`) and what it costs
(`extra_pass`). Its config entry (`AttackConfig`, here; `memray.config` assembles the trial schema), the
trial and the bench take names, needs and rules from `ATTACKS`, with no special case per attack. This module
imports no torch at import time (a model pass imports it when it runs), so the config can
be validated before anything heavy loads.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from memray import reference_attacks
from memray.reference_attacks import MIN_REFERENCES, ReferenceScorer
from memray.registry import Registry, load_entry_points
from memray.schema import ConfigError, Schema

if TYPE_CHECKING:
    from memray.scoring import TokenStats

#: (attack config, target statistics, text, reference statistics or None) -> score
AttackFn = Callable[["AttackConfig", "TokenStats", str, "TokenStats | None"], float]


@dataclass
class AttackSetup:
    """What a trial offers the attacks' `prepare` once, before its first epoch.

    token_ids(texts, max_length): the trial's tokenization (BOS first where the tokenizer
    has one, truncated to max_length); bos: the BOS id or None; validation_ids: the validation
    split's token ids (never scored as members or non-members); context_length: the
    model's positions; max_length: data.max_length; vocab_size: the output layer's size;
    frequency_texts(): (what they are, texts) of the corpus the model's token frequencies
    are counted on, read when first asked for; source: the config file, for ConfigError;
    virtual_tokens: positions a prompt-based method prepends to every input.
    """

    token_ids: Callable[[list[str], int], list[list[int]]]
    bos: int | None
    validation_ids: list[list[int]]
    context_length: int
    max_length: int
    vocab_size: int
    frequency_texts: Callable[[], tuple[str, list[str]]]
    source: str = "config"
    virtual_tokens: int = 0  # positions a prompt-based method prepends, taken from the context
    # `token_frequencies`' result and its record, counted once for every attack that reads them
    _frequencies: "tuple[np.ndarray, dict[str, Any]] | None" = field(default=None, init=False, repr=False)


@dataclass
class Prepared:
    """What an attack's `prepare` built: its state for `score_set`, and the facts of it that
    result.json records beside the attack's rules (e.g. how many shots fit, the frequency source)."""

    state: Any
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackContext:
    """What `score_set` attacks read, one entry per scored sample in the same order.

    token_ids: the scored token ids; texts: the scored texts (`memray.scoring.scored_texts`);
    target: the measured model's statistics; reference: the reference model's, or None;
    model: the measured model (None where no attack needs it); score(token_ids): the
    trial's batched scorer on that model (`memray.scoring.score_tokens` with the trial's
    batch size and virtual tokens, no vocabulary statistics); virtual_tokens: positions a
    prompt-based method prepends to the model's output; prepared: label -> `Prepared`;
    validation_ids, validation: the validation split's ids and the model's statistics on it.
    """

    token_ids: list[list[int]]
    texts: list[str]
    target: list[TokenStats]
    reference: list[TokenStats] | None = None
    model: Any = None
    score: Callable[[list[list[int]]], list[TokenStats]] | None = None
    virtual_tokens: int = 0
    prepared: dict[str, Prepared] = field(default_factory=dict)
    # the validation split (never trained on, never scored as members or non-members): its
    # token ids and the measured model's statistics on it, the known non-members of `quantile`
    validation_ids: list[list[int]] = field(default_factory=list)
    validation: list[TokenStats] = field(default_factory=list)


#: (attack config, context) -> one score per sample
SetScoreFn = Callable[["AttackConfig", AttackContext], np.ndarray]
#: (attack config, setup) -> its state
PrepareFn = Callable[["AttackConfig", AttackSetup], Prepared]


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
    # scored over all samples at once from an AttackContext (`score` is then never called)
    score_set: SetScoreFn | None = None
    prepare: PrepareFn | None = None  # builds the attack's set-up once per trial
    needs_model: bool = False  # score_set runs the model (AttackContext.model, .score)
    # what the attack costs beyond the one scoring pass every attack shares: "" none, else
    # a phrase for `memray bench` and the README ("a forward pass over prefix + sample")
    extra_pass: str = ""
    # the rules of the paper's code memray follows (result.json `attack_rules[<label>]`);
    # part of the trial id of a trial that lists the attack
    rules: Mapping[str, str] = field(default_factory=dict)
    # settings of AttackConfig (besides k and references) the attack takes -> their defaults
    options: Mapping[str, Any] = field(default_factory=dict)
    # (attack config, trial config) -> why the trial cannot run it ("<field>: <reason>"), or
    # None; called while the config is validated, before anything loads
    check: Callable[[AttackConfig, Any], str | None] | None = None

    @property
    def needs_reference_models(self) -> bool:
        return bool(self.reference_scorers)


ATTACKS: Registry[AttackSpec] = Registry("attack")


#: AttackConfig settings that an attack takes where its registry entry lists them in
#: `options` (with their defaults); unset elsewhere, and then out of the trial id.
ATTACK_OPTIONS: tuple[str, ...] = ("shots", "neighbours", "mask_model")


class AttackConfig(Schema):
    name: str  # a registered attack (memray.attacks.ATTACKS)
    k: float | None = Field(None, gt=0, le=1)  # mink / mink++: share of lowest-scoring tokens
    references: int | None = None  # lira / rmia: reference models trained on halves of the audit pool (even, >= 4)
    shots: int | None = Field(None, gt=0)  # recall: non-member shots from the validation split in the prefix
    neighbours: int | None = Field(None, gt=0)  # neighbourhood: one-word neighbours scored per sample
    mask_model: str | None = None  # neighbourhood: local folder of its mask-filling model (BERT-like)

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
        options = ATTACKS[self.name].options
        for option in ATTACK_OPTIONS:  # settings an attack's registry entry declares, with their defaults
            if getattr(self, option) is None and options.get(option) is not None:
                setattr(self, option, options[option])
            elif getattr(self, option) is not None and option not in options:
                takes = [name for name in ATTACKS if option in ATTACKS[name].options]
                raise ValueError(f"{option} is only used by {' and '.join(takes)}, not {self.name}")
        return self

    @property
    def label(self) -> str:
        """Name used in metric keys: `mink`, or `mink@0.1` when k is not the attack's default,
        `recall@shots3` when an option is not its default (options defaulting to None, such
        as a model path, stay out of the label)."""
        label = self.name
        if self.k is not None and self.k != ATTACKS[self.name].default_k:
            label += f"@{self.k:g}"
        for option, default in ATTACKS[self.name].options.items():
            if getattr(self, option) != default and default is not None:  # None: a resource (a path), not a variant
                label += f"@{option}{getattr(self, option)}"
        return label

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


def set_attack(name: str, *, prepare: PrepareFn | None = None, needs_model: bool = False, extra_pass: str = "",
               rules: Mapping[str, str] | None = None, options: Mapping[str, Any] | None = None,
               check: Callable[[AttackConfig, Any], str | None] | None = None) -> Callable[[SetScoreFn], SetScoreFn]:
    """Register an attack scored over all samples at once (`score_set`) under `name`;
    ValueError if the name is taken."""

    def register(function: SetScoreFn) -> SetScoreFn:
        ATTACKS.add(name, AttackSpec(name, _scored_as_a_set, score_set=function, prepare=prepare,
                                     needs_model=needs_model, extra_pass=extra_pass, rules=dict(rules or {}),
                                     options=dict(options or {}), check=check))
        return function

    return register


def _scored_as_a_set(config: AttackConfig, target: TokenStats, text: str, reference: TokenStats | None) -> float:
    raise ValueError(f"attack {config.name!r} is scored over all samples at once (AttackSpec.score_set), not per sample")


def prepare_attacks(attacks: list[AttackConfig], setup: AttackSetup) -> dict[str, Prepared]:
    """Each listed attack's set-up (label -> `Prepared`), for those that have a `prepare`."""
    return {config.label: ATTACKS[config.name].prepare(config, setup)
            for config in attacks if ATTACKS[config.name].prepare is not None}


def attack_rules(attacks: list[AttackConfig], prepared: Mapping[str, Prepared] | None = None) -> dict[str, Any]:
    """The rules result.json records (`attack_rules`): the shared `ATTACK_RULES`, then per
    listed attack that has rules of its own, label -> its rules and what its set-up found."""
    rules: dict[str, Any] = dict(ATTACK_RULES)
    for config in attacks:
        spec = ATTACKS[config.name]
        found = prepared.get(config.label) if prepared else None
        if spec.rules or found is not None:
            rules[config.label] = {**spec.rules, **(found.record if found is not None else {})}
    return rules


def attack_scores(
    attacks: list[AttackConfig],
    target: list[TokenStats],
    texts: list[str],
    reference: list[TokenStats] | None,
    context: AttackContext | None = None,
) -> dict[str, np.ndarray]:
    """Scores of every attack: label (`AttackConfig.label`) -> float64 array, one per sample.
    Attacks scored from reference models (lira, rmia) are left out: `memray.references`
    adds them once the references are trained.

    target: the fine-tuned model's statistics per sample; texts: the samples' texts (zlib);
    reference: the reference model's statistics for the same samples, or None when no
    listed attack needs them (`ref` does); context: what attacks scored as a set read
    (token ids, the model, their set-up), needed only when one is listed.
    """
    if len(texts) != len(target) or (reference is not None and len(reference) != len(target)):
        raise ValueError(
            f"one entry per sample is needed: {len(target)} target statistics, {len(texts)} texts, "
            f"{'no' if reference is None else len(reference)} reference statistics"
        )
    refs = reference if reference is not None else [None] * len(target)
    scores: dict[str, np.ndarray] = {}
    for config in attacks:
        spec = ATTACKS[config.name]
        if spec.needs_reference_models:
            continue
        if spec.score_set is not None:
            if context is None:
                raise ValueError(f"attack {config.name!r} is scored from an AttackContext (token ids, model, "
                                 "set-up); none was given")
            values = np.asarray(spec.score_set(config, context), dtype=np.float64)
            if values.shape != (len(target),):
                raise ValueError(f"attack {config.name!r} returned {values.shape} scores for {len(target)} samples")
            scores[config.label] = values
            continue
        function = spec.score
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


# ---------------------------------------------------------------------------------------
# Attacks scored as a set: token ids, a set-up of their own, or a model pass
# ---------------------------------------------------------------------------------------


def _without_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids[1:] if bos is not None and ids[:1] == [bos] else list(ids)


#: ReCaLL's default number of non-member shots: MIMIR's `recall_config.num_shots` default is
#: 1; Xie et al. 2024 report gains up to about 7 shots on WikiMIA, and a sweep's prefix cap
#: (half the context) keeps as many whole shots as fit.
RECALL_SHOTS = 5


def _prepare_recall(config: AttackConfig, setup: AttackSetup) -> Prepared:
    """ReCaLL's non-member prefix: the first `shots` validation samples (never scored: the
    validation split is disjoint from members and non-members), each without its BOS,
    joined after one BOS, whole shots kept in order while the prefix fits its cap: half the
    model's context, and no more than leaves room for a max_length sample."""
    field_name = f"attacks.{config.label}.shots"
    if len(setup.validation_ids) < config.shots:
        raise ConfigError(setup.source, field_name,
                          f"ReCaLL draws its {config.shots} non-member shots from the validation split, which holds "
                          f"{len(setup.validation_ids)} samples: lower shots or raise data.validation")
    cap = min(setup.context_length // 2, setup.context_length - setup.max_length - setup.virtual_tokens)
    prefix = [setup.bos] if setup.bos is not None else []
    used = 0
    for ids in setup.validation_ids[:config.shots]:
        shot = _without_bos(ids, setup.bos)
        if len(prefix) + len(shot) > cap:
            break
        prefix += shot
        used += 1
    if used == 0:
        raise ConfigError(setup.source, "data.max_length",
                          f"ReCaLL's prefix may take at most {cap} tokens (half of the model's {setup.context_length} "
                          f"positions, and what a {setup.max_length}-token sample and {setup.virtual_tokens} virtual tokens "
                          "leave), too few for one whole "
                          "validation sample: lower data.max_length")
    return Prepared((prefix, setup.bos), {"shots": used, "shots_asked": config.shots, "prefix_tokens": len(prefix),
                                          "prefix_cap": cap, "context": setup.context_length})


def _check_recall(config: AttackConfig, trial: Any) -> str | None:
    if trial.data.validation < config.shots:
        return (f"attacks.{config.label}.shots: ReCaLL draws its {config.shots} shots from the validation split, "
                f"which holds data.validation = {trial.data.validation}: lower shots or raise data.validation")
    return None


@set_attack("recall", prepare=_prepare_recall, needs_model=True, options={"shots": RECALL_SHOTS}, check=_check_recall,
            extra_pass="a forward pass over prefix + sample",
            rules={"shots": "the first `shots` validation samples (never scored samples), each without BOS, "
                            "joined after one BOS (Xie et al. 2024's code: non-member texts as the prefix)",
                   "prefix_cap": "whole shots while the prefix fits min(context // 2, context - max_length - virtual "
                                 "tokens) tokens",
                   "score": "LL(x | prefix) / LL(x), mean token log-likelihoods of the same target tokens"})
def recall_score(config: AttackConfig, context: AttackContext) -> np.ndarray:
    """ReCaLL: the sample's mean log-likelihood conditioned on a prefix of non-member texts,
    over its unconditioned one. Both are negative; a non-member prefix lowers a member's
    likelihood more than a non-member's, so the ratio is higher for members.

    Xie et al. 2024, "ReCaLL: Membership Inference via Relative Conditional
    Log-Likelihoods", https://arxiv.org/abs/2406.15968
    """
    if context.score is None:
        raise ValueError("attack 'recall' runs the model: AttackContext.score is needed")
    prefix, bos = context.prepared[config.label].state
    conditioned = context.score([prefix + _without_bos(ids, bos) for ids in context.token_ids])
    scores = []
    for ids, joint, alone in zip(context.token_ids, conditioned, context.target):
        targets = len(ids) - 1  # the tokens the unconditioned pass scored: all but the first
        conditioned_ll = float(np.mean(joint.logprobs[-targets:], dtype=np.float64))
        scores.append(conditioned_ll / min(-alone.loss, -1e-12))
    return np.array(scores, dtype=np.float64)


#: DC-PDD's cap on each token's calibrated probability (Zhang et al. 2024's `a`, MIMIR's default).
DCPDD_CAP = 0.01
#: Tokens read per text of the frequency corpus (MIMIR's `max_tok`).
DCPDD_MAX_TOKENS = 1024


def token_frequencies(token_ids: list[list[int]], vocab_size: int) -> np.ndarray:
    """Laplace-smoothed relative frequency of every token id: (1 + count) / (total + vocab_size)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in token_ids:
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return (1 + counts) / (counts.sum() + vocab_size)


def _prepare_dcpdd(config: AttackConfig, setup: AttackSetup) -> Prepared:
    """DC-PDD's token frequencies, counted on `setup.frequency_texts()` with the model's
    tokenizer (each text's first DCPDD_MAX_TOKENS tokens); `quantile` counts the same."""
    if setup._frequencies is None:  # read, tokenized and counted once per trial (dcpdd and quantile share it)
        what, texts = setup.frequency_texts()
        if not texts:
            raise ConfigError(setup.source, f"attacks.{config.label}",
                              f"DC-PDD counts token frequencies on {what}, which holds no text: use a larger dataset")
        ids = setup.token_ids(texts, DCPDD_MAX_TOKENS)
        setup._frequencies = (token_frequencies(ids, setup.vocab_size), {
            "frequency_source": what, "frequency_texts": len(texts), "frequency_tokens": sum(map(len, ids))})
    frequencies, record = setup._frequencies
    return Prepared(frequencies, dict(record))


@set_attack("dcpdd", prepare=_prepare_dcpdd,
            rules={"frequencies": "Laplace-smoothed token counts (1 + n) / (N + V) on the base model's pretraining "
                                  "text where memray has it (built-ins), else on dataset samples outside members, "
                                  "non-members and validation (Zhang et al. 2024's code counts C4)",
                   "tokens": "the first occurrence of each distinct token among the scored targets",
                   "cap": f"each token's p(x) * log(1 / f(x)) capped at a = {DCPDD_CAP}"})
def dcpdd_score(config: AttackConfig, context: AttackContext) -> np.ndarray:
    """DC-PDD: each token's probability calibrated by its frequency in a reference corpus,
    p(x_i) * log(1 / f(x_i)), capped at a, averaged over the first occurrence of each
    distinct token; a member's tokens are likelier than their frequency alone explains.

    Zhang et al. 2024, "Pretraining Data Detection for Large Language Models: A
    Divergence-based Calibration Method", https://arxiv.org/abs/2409.14781
    """
    frequencies = context.prepared[config.label].state
    scores = []
    for ids, stats in zip(context.token_ids, context.target):
        targets = np.asarray(ids[1:], dtype=np.int64)  # logprobs[t] is the log-prob of ids[t + 1]
        _, first = np.unique(targets, return_index=True)
        first.sort()
        calibrated = np.exp(stats.logprobs[first].astype(np.float64)) * -np.log(frequencies[targets[first]])
        scores.append(float(np.mean(np.minimum(calibrated, DCPDD_CAP))))
    return np.array(scores, dtype=np.float64)


@set_attack("gradnorm", needs_model=True, extra_pass="a forward and backward pass per sample",
            rules={"parameters": "the trained parameters (requires_grad), the model's own gradients kept aside",
                   "loss": "the sample's mean token loss (the targets every attack scores)",
                   "norm": "max-abs (p = inf) norm of each parameter tensor's gradient, mean over the tensors "
                           "(MIMIR's default p)"})
def gradnorm_score(config: AttackConfig, context: AttackContext) -> np.ndarray:
    """GradNorm: the negated norm of the sample's loss gradient over the trained
    parameters; a member sits near a minimum of its loss, where the gradient is small.

    Proposed for language models' training data in Wang et al. 2024, "Pandora's White-Box:
    Precise Training Data Detection and Extraction in Large Language Models",
    https://arxiv.org/abs/2402.17012; MIMIR's `GradNormAttack`.
    """
    import torch  # here, not at import time: memray.attacks imports no torch

    model = context.model
    if model is None:
        raise ValueError("attack 'gradnorm' runs the model: AttackContext.model is needed")
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        raise ValueError("attack 'gradnorm' needs trained parameters (requires_grad); the model has none")
    kept = [p.grad for p in trained]  # the Trainer's gradients, put back after
    device = trained[0].device
    scores = []
    try:
        for ids in context.token_ids:
            for parameter in trained:
                parameter.grad = None
            input_ids = torch.tensor([ids], device=device)
            with torch.enable_grad():
                logits = model(input_ids=input_ids, use_cache=False).logits[:, context.virtual_tokens:]
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:])
                loss.backward()
            norms = [p.grad.detach().abs().max() for p in trained if p.grad is not None]
            scores.append(-float(torch.stack(norms).float().mean()) if norms else 0.0)
    finally:
        for parameter, grad in zip(trained, kept):
            parameter.grad = grad
    return np.array(scores, dtype=np.float64)


#: The quantile level the quantile attack's regression fits: the median, since the AUC
#: compares its score at every threshold (Bertran et al. fit 1 - the target FPR, for one).
QUANTILE_LEVEL = 0.5
#: Validation samples (known non-members) the regression needs at least: ten per coefficient.
QUANTILE_MIN_SAMPLES = 30


def quantile_features(token_ids: list[list[int]], frequencies: np.ndarray) -> np.ndarray:
    """The quantile regression's features of each sample, from its tokens alone (never the
    target model): log of its scored token count and the mean log frequency of those
    tokens in the frequency corpus (how common its words are); one row per sample."""
    rows = []
    for ids in token_ids:
        targets = np.asarray(ids[1:], dtype=np.int64)
        rows.append([np.log(len(targets)), float(np.mean(np.log(frequencies[targets])))])
    return np.array(rows, dtype=np.float64)


def fit_quantile(features: np.ndarray, values: np.ndarray, level: float = QUANTILE_LEVEL) -> np.ndarray:
    """Coefficients (intercept first) of the linear `level`-quantile regression of `values`
    on `features`: the pinball loss minimized exactly as a linear program (HiGHS)."""
    from scipy.optimize import linprog  # here: memray.attacks imports nothing heavy at import time

    design = np.column_stack([np.ones(len(values)), features])
    n, k = design.shape
    # minimize level * sum(u) + (1 - level) * sum(v) with design @ beta + u - v = values, u, v >= 0
    cost = np.concatenate([np.zeros(k), np.full(n, level), np.full(n, 1 - level)])
    equality = np.hstack([design, np.eye(n), -np.eye(n)])
    bounds = [(None, None)] * k + [(0, None)] * (2 * n)
    found = linprog(cost, A_eq=equality, b_eq=values, bounds=bounds, method="highs")
    if not found.success:
        raise ValueError(f"the quantile regression found no fit: {found.message}")
    return found.x[:k]


def _prepare_quantile(config: AttackConfig, setup: AttackSetup) -> Prepared:
    """The quantile attack's token frequencies (DC-PDD's corpus) and a check that the
    validation split holds enough known non-members to fit the regression on."""
    if len(setup.validation_ids) < QUANTILE_MIN_SAMPLES:
        raise ConfigError(setup.source, "data.validation",
                          f"the quantile attack fits its regression on the validation split (known non-members), "
                          f"which holds {len(setup.validation_ids)} samples: at least {QUANTILE_MIN_SAMPLES} are needed")
    prepared = _prepare_dcpdd(config, setup)
    prepared.record["regression_samples"] = len(setup.validation_ids)
    return prepared


def _check_quantile(config: AttackConfig, trial: Any) -> str | None:
    if trial.data.validation < QUANTILE_MIN_SAMPLES:
        return (f"data.validation: the quantile attack fits its regression on the validation split, "
                f"{trial.data.validation} samples; at least {QUANTILE_MIN_SAMPLES} are needed")
    return None


@set_attack("quantile", prepare=_prepare_quantile, check=_check_quantile,
            rules={"regression": f"linear {QUANTILE_LEVEL:g}-quantile (pinball loss, exact) regression of the LOSS "
                                 "score -loss of the validation split (known non-members, never scored) under the "
                                 "measured model, refitted every epoch",
                   "features": "log scored-token count, mean log frequency of the tokens (DC-PDD's corpus): from "
                               "the text alone, no reference model",
                   "score": "-loss minus the predicted quantile (Bertran et al. 2023's score; MIMIR's regressor, "
                            "a hub transformer, is not available here)"})
def quantile_score(config: AttackConfig, context: AttackContext) -> np.ndarray:
    """Quantile regression: how far the sample's LOSS score lies above what a quantile
    regression fitted on known non-members predicts for a sample like it; no reference
    model is trained. A sample that is easy in itself (short, common words) is expected
    to score high, so only scoring higher than that marks a member.

    Bertran et al. 2023, "Scalable Membership Inference Attacks via Quantile Regression",
    https://arxiv.org/abs/2307.03694 (amazon-science/llm-qmia); MIMIR's `QuantileAttack`.
    """
    if not context.validation:
        raise ValueError("attack 'quantile' fits on the validation split: AttackContext.validation is empty")
    frequencies = context.prepared[config.label].state
    coefficients = fit_quantile(quantile_features(context.validation_ids, frequencies),
                                np.array([-stats.loss for stats in context.validation]))
    design = np.column_stack([np.ones(len(context.token_ids)), quantile_features(context.token_ids, frequencies)])
    return np.array([-stats.loss for stats in context.target]) - design @ coefficients


#: Neighbours per sample of the neighbourhood attack: Mattern et al. 2023 use 25-100
#: (more helps, each costs a forward pass per sample and epoch).
NEIGHBOURS = 25


def word_neighbours(text: str, count: int, substitute: Callable[[list[str], int], str | None]) -> list[str]:
    """Up to `count` neighbours of `text`, each with one word replaced (Mattern et al.
    2023's one-word substitutions): the positions spread evenly over the words, each word
    replaced by `substitute(words, position)` (None or the word itself: no neighbour
    there)."""
    words = text.split(" ")
    positions = [p for p in range(len(words)) if words[p].strip()]
    if not positions:
        return []
    wanted = min(count, len(positions))
    picked = [positions[round(i * (len(positions) - 1) / max(wanted - 1, 1))] for i in range(wanted)]
    neighbours = []
    for position in dict.fromkeys(picked):
        replacement = substitute(words, position)
        if replacement and replacement != words[position]:
            neighbours.append(" ".join([*words[:position], replacement, *words[position + 1:]]))
    return neighbours


def mask_filler(path: str) -> Callable[[list[str], int], str | None]:
    """`substitute` of `word_neighbours` from a local mask-filling model (a BERT-like
    fill-mask model): the most likely whole-word filler of the masked position other than
    the word itself."""
    from transformers import pipeline  # here: memray.attacks imports nothing heavy at import time

    fill = pipeline("fill-mask", model=path, tokenizer=path, device=-1)
    mask, special = fill.tokenizer.mask_token, set(fill.tokenizer.all_special_tokens)

    def substitute(words: list[str], position: int) -> str | None:
        masked = " ".join([*words[:position], mask, *words[position + 1:]])
        for candidate in fill(masked, top_k=10):  # the vocabulary's own word: subword pieces and specials skipped
            token = (fill.tokenizer.convert_ids_to_tokens(int(candidate["token"])) or "").strip()
            if token and token not in special and token != words[position] and token.isalnum():
                return token
        return None

    return substitute


def _prepare_neighbourhood(config: AttackConfig, setup: AttackSetup) -> Prepared:
    """The neighbourhood attack's neighbour maker (the mask-filling model at
    `mask_model`, a local path) and the trial's tokenization; neighbours are made once per
    scored text, on first use, and kept."""
    if config.mask_model is None:
        raise ConfigError(setup.source, f"attacks.{config.label}.mask_model",
                          "the neighbourhood attack needs a mask-filling model (BERT or T5, as a local folder): "
                          "none installs from a package registry, and the hub is not reached at run time")
    try:
        substitute = mask_filler(config.mask_model)
    except (OSError, ValueError) as err:
        raise ConfigError(setup.source, f"attacks.{config.label}.mask_model",
                          f"{config.mask_model}: not a loadable mask-filling model ({err})") from None
    return Prepared({"substitute": substitute, "token_ids": setup.token_ids, "max_length": setup.max_length,
                     "neighbours": {}}, {"mask_model": config.mask_model, "neighbours": config.neighbours})


def _check_neighbourhood(config: AttackConfig, trial: Any) -> str | None:
    if config.mask_model is None:
        return (f"attacks.{config.label}.mask_model: the neighbourhood attack needs a mask-filling model (BERT or T5) "
                "as a local folder; none installs from a package registry")
    return None


@set_attack("neighbourhood", prepare=_prepare_neighbourhood, needs_model=True, check=_check_neighbourhood, options={"neighbours": NEIGHBOURS,
                                                                                        "mask_model": None},
            extra_pass="a forward pass per neighbour (25 by default) per sample",
            rules={"neighbours": "one-word substitutions at positions spread evenly over the words, each word's most "
                                 "likely other whole-word filler under the mask-filling model; made once per text",
                   "score": "mean loss of the neighbours minus the sample's loss (its neighbours scored like it, "
                            "same tokenization and max_length)"})
def neighbourhood_score(config: AttackConfig, context: AttackContext) -> np.ndarray:
    """Neighbourhood attack: how much lower the sample's loss is than that of its
    neighbours, texts one word away from it; a member sits in a dip of the loss that its
    neighbours do not share. Samples with no neighbour score 0.

    Mattern et al. 2023, "Membership Inference Attacks against Language Models via
    Neighbourhood Comparison", https://arxiv.org/abs/2305.18462
    """
    if context.score is None:
        raise ValueError("attack 'neighbourhood' runs the model: AttackContext.score is needed")
    state = context.prepared[config.label].state
    made = state["neighbours"]
    for text in context.texts:
        if text not in made:
            made[text] = word_neighbours(text, config.neighbours, state["substitute"])
    flat = [neighbour for text in context.texts for neighbour in made[text]]
    losses = iter([stats.loss for stats in context.score(state["token_ids"](flat, state["max_length"]))] if flat else [])
    scores = []
    for text, alone in zip(context.texts, context.target):
        theirs = [next(losses) for _ in made[text]]
        scores.append(float(np.mean(theirs)) - alone.loss if theirs else 0.0)
    return np.array(scores, dtype=np.float64)


# units of installed packages (`memray.attacks` entry points), after memray's own
load_entry_points("memray.attacks")
