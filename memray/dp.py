"""DP-SGD training of one trial (`train.dp`): memray's own loop instead of the Trainer's.

The Trainer draws fixed-size shuffled batches and clips the whole batch's gradient; DP-SGD
(Abadi et al. 2016, arXiv 1607.00133) needs what its accountant assumes: every step a
Poisson sample of the training texts (each in with probability q = batch_size / texts, so
`train.batch_size` is the expected batch), each text's gradient clipped to `dp.clip`, their
sum plus Gaussian noise of std sigma x clip, divided by the expected batch. Opacus
calibrates sigma (`get_noise_multiplier`) so that its accountant reaches `dp.epsilon`
exactly after the last epoch, and accounts each step; clipping, summing and noising are
written out here (`dp_step`), as Opacus's `DPOptimizer` does them, so that an empty Poisson
sample is a step of noise alone, as the analysis says.

The per-sample gradients come from one of two engines (`GRADIENT_ENGINES`), chosen by the
method's registry entry (`MethodSpec.dp_gradients`):
- `opacus`: Opacus's `GradSampleModule`, a rule per layer (and torch.func for a layer it has
  none for, e.g. transformers' Conv1D), one batched backward pass. Right only where every
  trained weight sits in a layer that runs once per text on that text's activations (full,
  head, LoRA, prefix tuning).
- `torch.func`: the whole model as a function of its trained weights, `torch.func.grad` of
  one text's loss, vmapped over the texts (each text its own dropout). Right for any method
  whose forward pass torch.func can trace: DoRA (its magnitude is trained in a module called
  with keyword arguments, which Opacus's hooks do not see), (IA)^3 (vectors in a
  ParameterDict), prompt tuning and P-tuning (PEFT encodes the soft prompt once per batch
  and repeats it, so a layer rule sees one text, not the batch). Each text runs alone, so
  the model is shown an all-ones attention mask: with right padding and a causal model the
  padding comes after every real token and changes none of its logits (a left-padded batch
  is refused).

The loss is each text's mean token loss (a sum over texts, so that a per-sample gradient is
that text's own); a sample larger than the batch size is split into chunks of batch_size
texts (clipping is per text, so chunks change nothing but memory). The per-epoch hook,
checkpoints (`checkpoint-<step>/` with `trainer_state.json`, the trained weights, the
optimizer, the accountant's history and the generators' states) and resume follow
`memray.train.fit`'s contract.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from memray.config import DPConfig, TrainConfig
from memray.methods import DP_GRADIENT_ENGINES
from memray.privacy import default_delta
from memray.train import EpochEnd, TrainingDiverged, saved_checkpoints, use_bf16

DP_STATE_FILE = "dp_state.pt"
WEIGHTS_FILE = "trained.pt"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class DPPlan:
    """What a DP trial's guarantee rests on: the `dp` record of its result.json."""

    target_epsilon: float
    delta: float
    delta_rule: str  # where delta came from
    clip: float
    noise_multiplier: float  # noise std / clip
    sample_rate: float  # q: each text's probability of being in a step's sample
    steps_per_epoch: int
    steps: int  # over all epochs
    accountant: str  # the accountant, named
    per_sample_gradients: str  # the engine that computes them: a key of GRADIENT_ENGINES

    def record(self) -> dict:
        return asdict(self)


#: Opacus's accountants by `train.dp.accountant`, named as result.json records them
ACCOUNTANT_NAMES = {"rdp": "opacus RDPAccountant (Renyi DP of the Poisson-subsampled Gaussian, Mironov et al. 2019)",
                    "prv": "opacus PRVAccountant (privacy random variables, Gopi et al. 2021)"}


def calibrate(dp: DPConfig, texts: int, batch_size: int, epochs: int, gradients: str) -> DPPlan:
    """The noise multiplier that spends `dp.epsilon` in `epochs` epochs over `texts` texts with
    an expected batch of `batch_size` (Opacus's `get_noise_multiplier`, to 0.001 below epsilon);
    `gradients`: the per-sample gradient engine (a key of GRADIENT_ENGINES)."""
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate = min(1.0, batch_size / texts)
    steps_per_epoch = math.ceil(texts / batch_size)
    delta = dp.delta if dp.delta is not None else default_delta(texts)
    rule = "train.dp.delta" if dp.delta is not None else f"1 / (10 x {texts} training texts)"
    steps = steps_per_epoch * epochs
    sigma = (get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                  accountant=dp.accountant, epsilon_tolerance=0.001) if steps else 0.0)
    return DPPlan(dp.epsilon, delta, rule, dp.clip, float(sigma), sample_rate, steps_per_epoch, steps,
                  ACCOUNTANT_NAMES[dp.accountant], gradients)


def make_accountant(dp: DPConfig):
    from opacus.accountants import create_accountant

    return create_accountant(dp.accountant)


def spent_epsilon(accountant, delta: float) -> float:
    """The accountant's epsilon at `delta` after the steps it has seen (0 before any)."""
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def _position_kwargs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    """position_ids, one row per text: the model would broadcast one row over the batch, and a
    trained position embedding (GPT-2's wpe) would then get one gradient for all texts. None
    for prompt tuning and P-tuning: PEFT sets its own for the virtual tokens."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return {}
    return {"position_ids": torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)}


def _mean_token_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each text's mean next-token loss [batch] from the model's logits (virtual tokens that
    prompt tuning and P-tuning put in front of the input are left out)."""
    logits = logits[:, logits.shape[1] - input_ids.shape[1]:]
    targets, keep = input_ids[:, 1:], attention_mask[:, 1:].to(logits.dtype)
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (token_losses * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


def text_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each text's mean next-token loss [batch] (virtual tokens that prompt tuning and
    P-tuning put in front of the input are left out of it)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **_position_kwargs(model, input_ids)).logits
    return _mean_token_losses(logits, input_ids, attention_mask)


class OpacusGradients:
    """Per-sample gradients by Opacus's layer rules (`GradSampleModule`, one backward pass)."""

    def __init__(self, model: torch.nn.Module, parameters: list[torch.nn.Parameter]):
        from opacus import GradSampleModule

        self.parameters = parameters
        self.sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 autocast: ContextManager) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(each text's loss [batch], each trained parameter's per-text gradients [batch, ...])."""
        with autocast:
            per_text = text_losses(self.sampled, input_ids, attention_mask)
        with warnings.catch_warnings():
            # Opacus's backward hooks on a frozen first layer (LoRA, head): harmless, said once a step
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_text.sum().backward()
        samples = [p.grad_sample for p in self.parameters]
        for p in self.parameters:
            p.grad_sample = None
            p.grad = None
        return per_text.detach(), samples

    def close(self) -> None:
        self.sampled._close()  # hooks off: the model evaluates and saves as it was


class TorchFuncUnsupported(RuntimeError):
    """A model whose forward pass torch.func cannot vmap (data-dependent control flow)."""


class FunctionalGradients:
    """Per-sample gradients by torch.func: `grad` of one text's loss as a function of the
    trained weights (`functional_call` on the whole model), vmapped over the texts."""

    def __init__(self, model: torch.nn.Module, parameters: list[torch.nn.Parameter]):
        from torch.func import functional_call, grad, vmap

        self.model = model
        self.parameters = parameters
        by_id = {id(p) for p in parameters}
        self.names = [name for name, p in model.named_parameters() if id(p) in by_id]
        if len(self.names) != len(parameters):
            raise ValueError("torch.func per-sample gradients: a trained parameter is shared or not in the model")

        def one_text(weights: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor):
            input_ids, attention_mask = input_ids[None], attention_mask[None]
            # all ones, not the text's own: a vmapped mask would reach transformers' mask
            # checks, which branch on its values; with right padding the causal model's
            # logits at the real tokens do not depend on what follows them
            seen = torch.ones(input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)  # not vmapped
            logits = functional_call(model, weights, args=(), kwargs={
                "input_ids": input_ids, "attention_mask": seen, **_position_kwargs(model, input_ids)}).logits
            loss = _mean_token_losses(logits, input_ids, attention_mask)[0]
            return loss, loss

        self.per_text = vmap(grad(one_text, has_aux=True), in_dims=(None, 0, 0), randomness="different")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 autocast: ContextManager) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("torch.func per-sample gradients need right-padded texts (the tokenizer's padding_side)")
        weights = {name: p.detach() for name, p in zip(self.names, self.parameters)}
        try:
            with autocast:
                grads, losses = self.per_text(weights, input_ids, attention_mask)
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
            raise TorchFuncUnsupported(
                f"train.dp: the per-sample gradients by torch.func cannot run {type(self.model).__name__}: its forward "
                f"pass branches on tensor values, which torch.func.vmap cannot trace ({str(err).splitlines()[0][:160]}); "
                "the methods whose per-sample gradients come from Opacus's layer rules (README: Differential "
                "privacy) train it under DP") from err
        return losses.detach(), [grads[name] for name in self.names]

    def close(self) -> None:
        pass


#: DP-SGD's per-sample gradient engines by name (module docstring): those validation accepts,
#: memray.methods.DP_GRADIENT_ENGINES, each with its implementation
GRADIENT_ENGINES: dict[str, type[OpacusGradients] | type[FunctionalGradients]] = {
    "opacus": OpacusGradients, "torch.func": FunctionalGradients}
if GRADIENT_ENGINES.keys() != DP_GRADIENT_ENGINES.keys():
    raise ImportError(f"memray.dp implements the per-sample gradient engines {', '.join(GRADIENT_ENGINES)}; "
                      f"memray.methods.DP_GRADIENT_ENGINES names {', '.join(DP_GRADIENT_ENGINES)}")


def clipped_sum(per_sample: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """Sum over the samples of each parameter's per-sample gradients [batch, ...], each
    sample's gradient (over all parameters together) scaled to an L2 norm of at most `clip`
    (as Opacus's DPOptimizer: factor min(1, clip / (norm + 1e-6)))."""
    samples = [g.float() for g in per_sample]
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=1) for g in samples], dim=1).norm(2, dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factors, g) for g in samples]


def dp_step(parameters: list[torch.nn.Parameter], summed: list[torch.Tensor] | None, plan: DPPlan, expected_batch: int,
            generator: torch.Generator) -> None:
    """Set each parameter's `.grad` to (its clipped sum + N(0, (sigma clip)^2)) / expected batch;
    `summed` None: an empty sample, noise alone. The noise comes from `generator`, parameter by
    parameter in order."""
    std = plan.noise_multiplier * plan.clip
    for index, parameter in enumerate(parameters):
        noise = torch.normal(0.0, std, parameter.shape, generator=generator, device=generator.device)
        total = noise if summed is None else summed[index] + noise
        parameter.grad = (total / expected_batch).to(parameter.dtype)


@dataclass
class _DPState:
    epoch: int
    step: int


def _save(directory: Path, state: _DPState, model: torch.nn.Module, names: list[str], optimizer, scheduler,
          accountant, noise: torch.Generator, sampler: torch.Generator, keep: int) -> Path:
    checkpoint = directory / f"checkpoint-{state.step}"
    partial = directory / f".checkpoint-{state.step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    parameters = dict(model.named_parameters())
    torch.save({name: parameters[name].detach().cpu() for name in names}, partial / WEIGHTS_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / OPTIMIZER_FILE)
    torch.save({"accountant_history": list(accountant.history), "noise": noise.get_state(),
                "sampler": sampler.get_state(), "torch": torch.get_rng_state()}, partial / DP_STATE_FILE)
    # written last: memray.train.saved_checkpoints takes a folder with it as complete
    (partial / "trainer_state.json").write_text(json.dumps({"epoch": float(state.epoch), "global_step": state.step}))
    shutil.rmtree(checkpoint, ignore_errors=True)
    partial.rename(checkpoint)
    for old in saved_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return checkpoint


def fit_dp(model: torch.nn.Module, tokenizer, train_ids: list[list[int]], train: TrainConfig, plan: DPPlan, *, lr: float,
           seed: int, checkpoints_dir: Path, evaluate: Callable[[int], None], on_epoch_end: Callable,
           resume_from: Path | None = None) -> None:
    """Train `model` under DP-SGD for `train.epochs` epochs (`memray.train.fit`'s contract:
    `evaluate(epoch)` on the weights in memory, then `on_epoch_end(EpochEnd)` with the epoch's
    checkpoint and `privacy/epsilon`, the accountant's spent epsilon, in its metrics)."""
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    os.makedirs(checkpoints_dir, exist_ok=True)
    device = next(model.parameters()).device
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    parameters = [p for p in model.parameters() if p.requires_grad]
    per_sample = GRADIENT_ENGINES[plan.per_sample_gradients](model, parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=train.weight_decay)
    warmup = math.ceil(train.warmup_ratio * plan.steps)
    scheduler = get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(plan.steps, 1))
    accountant = make_accountant(train.dp)
    noise = torch.Generator(device=device).manual_seed(seed)
    sampler = torch.Generator().manual_seed(seed + 1)
    state = _DPState(epoch=0, step=0)
    if resume_from is not None:
        saved = torch.load(resume_from / WEIGHTS_FILE)
        current = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                current[name].copy_(value.to(device))
        saved_optimizer = torch.load(resume_from / OPTIMIZER_FILE, map_location=device, weights_only=False)
        optimizer.load_state_dict(saved_optimizer["optimizer"])
        scheduler.load_state_dict(saved_optimizer["scheduler"])
        dp_state = torch.load(resume_from / DP_STATE_FILE, weights_only=False)
        accountant.history = [tuple(entry) for entry in dp_state["accountant_history"]]
        noise.set_state(dp_state["noise"])
        sampler.set_state(dp_state["sampler"])
        torch.set_rng_state(dp_state["torch"])
        trainer_state = json.loads((resume_from / "trainer_state.json").read_text())
        state = _DPState(epoch=round(trainer_state["epoch"]), step=int(trainer_state["global_step"]))
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(train.precision))
    texts = len(train_ids)
    model.train()
    try:
        for epoch in range(state.epoch + 1, train.epochs + 1):
            losses: list[float] = []
            for _ in range(plan.steps_per_epoch):
                chosen = torch.nonzero(torch.rand(texts, generator=sampler) < plan.sample_rate).flatten().tolist()
                summed = None
                for start in range(0, len(chosen), train.batch_size):
                    batch = collator([{"input_ids": train_ids[i]} for i in chosen[start:start + train.batch_size]])
                    per_text, samples = per_sample(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                                   autocast)
                    losses.extend(per_text.float().cpu().tolist())
                    chunk = clipped_sum(samples, plan.clip)
                    del samples
                    summed = chunk if summed is None else [a + b for a, b in zip(summed, chunk)]
                dp_step(parameters, summed, plan, train.batch_size, noise)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
                state.step += 1
            train_loss = sum(losses) / len(losses) if losses else math.nan
            if losses and not math.isfinite(train_loss):
                raise TrainingDiverged(f"training loss is {train_loss} in epoch {epoch}")
            state.epoch = epoch
            evaluate(epoch)
            model.train()
            checkpoint = None
            if train.checkpoints:
                checkpoint = _save(checkpoints_dir, state, model, names, optimizer, scheduler, accountant, noise, sampler,
                                   train.keep_checkpoints)
            on_epoch_end(EpochEnd(epoch, train_loss, checkpoint,
                                  {"privacy/epsilon": spent_epsilon(accountant, plan.delta)}))
    finally:
        per_sample.close()
