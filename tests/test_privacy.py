"""DP-SGD (memray.dp) and the empirical epsilon (memray.privacy): a DP step equals a
hand-written one (per-sample gradients by one backward pass per text, clipped, summed,
noised from the seeded generator), for every method DP accepts; the spent epsilon equals
dp-accounting's RDP accountant; the audit's bound never exceeds the epsilon of a mechanism
of known epsilon and comes close to it with enough samples; train.dp is validated."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from memray import dp, methods, models, privacy
from memray.config import ConfigError, DPConfig, MethodConfig, ModelConfig
from memray.files import validate, validate_trial


def randomized_response(epsilon: float, members: int, nonmembers: int, rng: np.random.Generator):
    """(scores, is_member) of an epsilon-DP mechanism: each record reports its membership
    truthfully with probability e^eps / (1 + e^eps)."""
    truthful = math.exp(epsilon) / (1 + math.exp(epsilon))
    is_member = np.r_[np.ones(members, bool), np.zeros(nonmembers, bool)]
    flip = rng.random(members + nonmembers) >= truthful
    return (is_member ^ flip).astype(np.float64), is_member


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 4.0])
def test_audit_bound_never_exceeds_a_known_epsilon(epsilon):
    rng = np.random.default_rng(int(epsilon * 10))
    for _ in range(30):
        scores, is_member = randomized_response(epsilon, 500, 500, rng)
        noise = rng.normal(size=len(scores))  # a second, useless attack: the bound takes the best
        bound = privacy.epsilon_lower_bound({"rr": scores, "noise": noise}, is_member, delta=1e-5)
        assert 0 <= bound.epsilon_lb <= epsilon
        assert bound.epsilon_lb <= bound.ceiling


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_audit_bound_comes_within_half_of_a_known_epsilon_with_enough_samples(epsilon):
    scores, is_member = randomized_response(epsilon, 50_000, 50_000, np.random.default_rng(0))
    bound = privacy.epsilon_lower_bound({"rr": scores}, is_member, delta=1e-5)
    assert epsilon - 0.5 < bound.epsilon_lb <= epsilon
    assert bound.attack == "rr"


def test_audit_ceiling_is_the_perfect_attacks_bound():
    is_member = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    perfect = privacy.epsilon_lower_bound({"a": is_member.astype(float)}, is_member, delta=0.0)
    assert perfect.epsilon_lb == pytest.approx(perfect.ceiling)
    alpha = 0.05 / (2 * perfect.candidates)  # Bonferroni: 2 rates x the thresholds tried
    upper = 1 - alpha ** (1 / 100)  # Clopper-Pearson's upper bound of 0 out of 100
    assert perfect.ceiling == pytest.approx(math.log((1 - upper) / upper))
    blind = privacy.epsilon_lower_bound({"a": np.zeros(200)}, is_member, delta=0.0)
    assert blind.epsilon_lb == 0 and blind.attack is None


def test_canary_one_run_audit_holds_and_comes_close_on_a_known_epsilon():
    def canaries(epsilon, count, rng):
        inserted = rng.random(count) < 0.5  # each in with probability 1/2, as the paper's analysis assumes
        truthful = math.exp(epsilon) / (1 + math.exp(epsilon))
        scores = np.where(rng.random(count) < truthful, inserted, ~inserted) + 1e-9 * rng.random(count)
        return scores, inserted

    rng = np.random.default_rng(0)
    for epsilon in (1.0, 2.0):
        bounds = [privacy.canary_epsilon_lower_bound(*canaries(epsilon, 200, rng), delta=1e-5) for _ in range(60)]
        # a 95% bound: above the truth at most 5% of the time (here 3 of 60, binomially generous)
        assert sum(bound > epsilon for bound, _ in bounds) <= 6
        assert all(bound <= ceiling for bound, ceiling in bounds)
        bound, _ = privacy.canary_epsilon_lower_bound(*canaries(epsilon, 20_000, rng), delta=1e-5)
        assert epsilon - 0.5 < bound <= epsilon
    assert privacy.canary_epsilon_lower_bound(np.zeros(100), np.arange(100) < 50, delta=1e-5)[0] == 0


def test_spent_epsilon_equals_dp_accountings_rdp_accountant():
    import dp_accounting
    from dp_accounting import rdp

    plan = dp.calibrate(DPConfig(epsilon=4.0, delta=1e-5), texts=1000, batch_size=50, epochs=3, gradients="opacus")
    accountant = dp.make_accountant(DPConfig(epsilon=4.0, delta=1e-5))
    for _ in range(plan.steps):
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    spent = dp.spent_epsilon(accountant, plan.delta)
    assert spent == pytest.approx(4.0, abs=0.02)  # calibrated to spend the target at the last step

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    google = rdp.RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier))
    google.compose(dp_accounting.SelfComposedDpEvent(event, plan.steps))
    assert spent == pytest.approx(google.get_epsilon(plan.delta), rel=0.01)


def tiny_with(name: str, spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.load_model(validate(ModelConfig, {"name": name, "pretrained": False}, "test", "model"))
    wrapped, _ = methods.apply_method(model, TypeAdapter(MethodConfig).validate_python(spec))
    for module in wrapped.modules():  # dropout off: the per-text backward passes must see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return wrapped.train()


#: one config per method (and DoRA), from the registry: a new method gets a row by itself
DP_SPECS = [(name, {"name": name, **({"virtual_tokens": 4} if "virtual_tokens" in methods.METHODS[name].config.model_fields
                                     else {}), **({"rank": 4, "placement": "both"} if "rank" in methods.METHODS[name].config.model_fields else {})})
            for name in methods.METHODS] + [("dora", {"name": "lora", "rank": 4, "dora": True})]


def method_config(spec: dict):
    return TypeAdapter(MethodConfig).validate_python(spec)


def engine_cases(spec: dict) -> list[str]:
    """The method's own per-sample gradient engine, and torch.func (which must be right for
    every method, whatever the method's entry chooses)."""
    return sorted({methods.dp_gradients(method_config(spec)), "torch.func"})


#: every method (and DoRA) with its own engine and torch.func, on the model layouts memray
#: supports (GPT-2's Conv1D, Llama's Linear)
DP_CASES = [(model, spec, engine) for model in ("tiny-gpt2", "tiny-llama") for _, spec in DP_SPECS
            for engine in engine_cases(spec)]


def case_id(value):
    return value if isinstance(value, str) else "-".join(f"{v}" for v in value.values())


def test_every_builtin_method_trains_under_dp_and_opacus_only_where_its_layer_rules_see_each_text():
    engines = {name: methods.dp_gradients(method_config(spec)) for name, spec in DP_SPECS}
    assert all(methods.METHODS[spec["name"]].dp_refusal is None for _, spec in DP_SPECS)
    # DoRA's magnitude module (keyword arguments), (IA)^3's ParameterDict and the soft prompts
    # encoded once per batch are out of Opacus's reach; the rest are nn.Linear / Conv1D / Embedding
    assert engines == {"full": "opacus", "head": "opacus", "lora": "opacus", "prefix": "opacus",
                       "dora": "torch.func", "ia3": "torch.func", "prompt": "torch.func", "ptuning": "torch.func"}
    assert set(engines.values()) == set(methods.DP_GRADIENT_ENGINES) == set(dp.GRADIENT_ENGINES)


@pytest.mark.parametrize("model_name, spec, engine", DP_CASES, ids=case_id)
def test_a_dp_step_equals_a_hand_written_one(model_name, spec, engine):
    generator = torch.Generator().manual_seed(1)
    lengths = [12, 9, 5]
    ids = torch.randint(1, 4000, (3, 12), generator=generator)
    attention = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        attention[row, :length] = 1
    # by hand: one backward pass per text, its gradient clipped, the sum noised, divided by the expected batch
    reference = tiny_with(model_name, spec)
    ref_parameters = [p for p in reference.parameters() if p.requires_grad]
    per_text = []
    for row, length in enumerate(lengths):
        reference.zero_grad()
        dp.text_losses(reference, ids[row:row + 1, :length], attention[row:row + 1, :length]).sum().backward()
        per_text.append([p.grad.detach().clone() for p in ref_parameters])
    norms = [float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) for grads in per_text]
    clip = 0.5 * min(norms) + 0.5 * max(norms)  # binds on some texts, not on others
    total = [torch.zeros_like(p) for p in ref_parameters]
    for grads, norm in zip(per_text, norms):
        total = [t + min(1.0, clip / (norm + 1e-6)) * g for t, g in zip(total, grads)]
    noise = torch.Generator().manual_seed(7)
    expected = [(t + torch.normal(0.0, 0.7 * clip, t.shape, generator=noise)) / 4 for t in total]
    with torch.no_grad():
        hand_losses = [float(dp.text_losses(reference, ids[row:row + 1, :length], attention[row:row + 1, :length]))
                       for row, length in enumerate(lengths)]

    plan = dp.DPPlan(1.0, 1e-5, "test", clip=clip, noise_multiplier=0.7, sample_rate=0.5, steps_per_epoch=1, steps=1,
                     accountant="test", per_sample_gradients=engine)
    model = tiny_with(model_name, spec)
    parameters = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in parameters]
    per_sample = dp.GRADIENT_ENGINES[engine](model, parameters)
    losses, samples = per_sample(ids, attention, contextlib.nullcontext())
    per_sample.close()
    assert [tuple(g.shape) for g in samples] == [(3, *p.shape) for p in parameters]
    assert losses.tolist() == pytest.approx(hand_losses, rel=1e-5)
    summed = dp.clipped_sum(samples, plan.clip)
    dp.dp_step(parameters, summed, plan, expected_batch=4, generator=torch.Generator().manual_seed(7))
    got = [p.grad.clone() for p in parameters]
    for grad, want in zip(got, expected):
        # float32 sums in another order: equal to 1e-5 of the gradient's scale
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert all(torch.equal(b, p) for b, p in zip(before, parameters))  # a step sets gradients, moves nothing yet
    assert any(float(want.abs().max()) > 0 for want in expected)  # every case has a gradient to compare


def test_torch_func_gradients_refuse_left_padded_texts():
    model = tiny_with("tiny-llama", {"name": "ia3"})
    per_sample = dp.FunctionalGradients(model, [p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(1, 4000, (2, 6))
    left_padded = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        per_sample(ids, left_padded, contextlib.nullcontext())


def test_train_dp_is_validated_and_refused_where_it_cannot_be_private():
    base = {"train": {"dp": {"epsilon": 1}}}
    assert validate_trial(base, "x.yaml").train.dp.clip == 1.0
    with pytest.raises(ConfigError, match=r"x.yaml: train.dp.epsilon: .*greater than 0"):
        validate_trial({"train": {"dp": {"epsilon": 0}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"train.dp.epsilon: required"):
        validate_trial({"train": {"dp": {"clip": 1}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"^x.yaml: train.dp: train.grad_accum 2 is refused"):
        validate_trial({"train": {"dp": {"epsilon": 1}, "grad_accum": 2}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"^x.yaml: train.dp: train.deepspeed is refused"):
        validate_trial({"train": {"dp": {"epsilon": 1}, "deepspeed": {}}}, "x.yaml")


def test_a_method_unit_can_refuse_dp_or_name_an_engine_memray_lacks(monkeypatch):
    lora = methods.METHODS["lora"]
    base = {"train": {"dp": {"epsilon": 1}}, "method": {"name": "lora", "rank": 4}}
    monkeypatch.setitem(methods.METHODS._entries, "lora", dataclasses.replace(
        lora, dp_refusal=lambda method: "its adapters are shared across layers" if method.rank == 4 else None))
    with pytest.raises(ConfigError, match=r"^x.yaml: train.dp: method lora is refused under DP-SGD: its adapters are"):
        validate_trial(base, "x.yaml")
    assert validate_trial({**base, "method": {"name": "lora", "rank": 8}}, "x.yaml").train.dp.epsilon == 1
    monkeypatch.setitem(methods.METHODS._entries, "lora", dataclasses.replace(lora, dp_gradients=lambda m: "jax"))
    with pytest.raises(ConfigError, match=r"^x.yaml: .*method 'lora': its per-sample gradient engine 'jax' is not one of"):
        validate_trial(base, "x.yaml")
    assert validate_trial({"method": {"name": "lora"}}, "x.yaml").train.dp is None  # without DP, no engine asked


def test_trial_ids_without_dp_are_unchanged():
    plain = validate_trial({}, "x.yaml")
    explicit = validate_trial({"train": {"dp": None}}, "x.yaml")
    assert plain.trial_id() == explicit.trial_id()
    assert validate_trial({"train": {"dp": {"epsilon": 1}}}, "x.yaml").trial_id() != plain.trial_id()


def dp_trial(tmp_path, method: dict, epochs: int = 2, **train):
    return validate_trial({
        "seed": 0, "output_dir": str(tmp_path), "model": {"name": "tiny-gpt2"},
        "data": {"dataset": "pydoc", "max_length": 64, "members": 32, "nonmembers": 32, "validation": 16},
        "method": method, "train": {"epochs": epochs, "batch_size": 8, "dp": {"epsilon": 2.0}, **train},
        "eval": {"batch_size": 32}, "attacks": ["loss", "zlib"]}, "test")


def assert_resume_after_a_crash_repeats(config, trial_dir, whole: dict) -> None:
    """A trial that crashes after epoch 1 and is resumed ends with the numbers of `whole`, the
    same trial run in one go (the accountant, the sampler and the noise continue)."""
    from memray.trial import run_trial

    def crash_after_epoch_1(metrics, checkpoint):
        if metrics["epoch"] == 1:
            raise RuntimeError("injected fault")

    with pytest.raises(RuntimeError, match="injected fault"):
        run_trial(config, crash_after_epoch_1, trial_dir=trial_dir, progress=False)
    resumed = run_trial(config, trial_dir=trial_dir, progress=False)
    for key in ("train/loss", "val/loss", "privacy/epsilon", "mia/loss/auc"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key


def test_a_lora_dp_trial_spends_its_epsilon_and_resumes_with_its_accountant_and_sampler(tmp_path):
    from memray.results import CHECKPOINTS_DIR
    from memray.trial import run_trial

    config = dp_trial(tmp_path, {"name": "lora", "rank": 4, "lr": 0.01})
    models.load_model(config.model)  # the tiny base pretrained and cached first: its pretraining draws random numbers
    whole = run_trial(config, trial_dir=tmp_path / "whole", progress=False)
    record = json.loads((tmp_path / "whole" / "result.json").read_text())
    plan = record["dp"]
    assert plan["steps"] == 2 * plan["steps_per_epoch"] == 2 * math.ceil(32 / 8) and plan["sample_rate"] == 8 / 32
    assert plan["delta"] == pytest.approx(1 / 320) and "RDP" in plan["accountant"] and plan["noise_multiplier"] > 0
    spent = [row["privacy/epsilon"] for row in record["epochs"]]
    assert spent[0] == 0 < spent[1] < spent[2] and spent[2] == pytest.approx(2.0, abs=0.002)
    assert all(0 <= row["privacy/epsilon_lb"] <= row["privacy/epsilon_lb_ceiling"] for row in record["epochs"])
    assert all(row["privacy/epsilon_lb"] <= max(row["privacy/epsilon"], 0) for row in record["epochs"])
    trained = torch.load(next((tmp_path / "whole" / CHECKPOINTS_DIR).glob("checkpoint-*")) / "trained.pt")
    lora_b = [value for name, value in trained.items() if "lora_B" in name]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # B starts at zero: DP steps moved it
    assert_resume_after_a_crash_repeats(config, tmp_path / "resumed", whole)


@pytest.mark.parametrize("method, trained_key", [({"name": "lora", "rank": 4, "dora": True, "lr": 0.01}, "lora_magnitude"),
                                                 ({"name": "prompt", "virtual_tokens": 4, "init": "text", "lr": 0.03}, "prompt_encoder")],
                         ids=["dora", "prompt"])
def test_a_dp_trial_through_torch_func_trains_spends_its_epsilon_and_resumes(tmp_path, method, trained_key):
    from memray.results import CHECKPOINTS_DIR
    from memray.trial import run_trial

    config = dp_trial(tmp_path, method)
    models.load_model(config.model)  # the tiny base pretrained and cached first: its pretraining draws random numbers
    whole = run_trial(config, trial_dir=tmp_path / "whole", progress=False)
    record = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert record["dp"]["per_sample_gradients"] == "torch.func"
    assert record["epochs"][-1]["privacy/epsilon"] == pytest.approx(2.0, abs=0.002)
    assert all(row["privacy/epsilon_lb"] <= max(row["privacy/epsilon"], 0) for row in record["epochs"])
    # the weights of DoRA's magnitude module / the soft prompt moved from their (deterministic) init
    torch.manual_seed(0)
    fresh = dict(methods.apply_method(models.load_model(config.model), config.method)[0].named_parameters())
    trained = torch.load(next((tmp_path / "whole" / CHECKPOINTS_DIR).glob("checkpoint-*")) / "trained.pt")
    moved = {name: float((value - fresh[name].detach()).abs().max()) for name, value in trained.items() if trained_key in name}
    assert moved and all(change > 1e-4 for change in moved.values()), moved
    assert_resume_after_a_crash_repeats(config, tmp_path / "resumed", whole)


def test_dp_refusals_come_before_any_model_loads(tmp_path):
    from memray.files import load_sweep
    from memray.sweep.planning import check_rules

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: {train: {dp: {epsilon: 1}}}\nresources: [{workers: 2, cpus_per_worker: 1}]\n")
    sweep, cells = load_sweep(path)
    with pytest.raises(ConfigError, match=r"resources.0.workers: .*train.dp: DP-SGD runs in one process"):
        check_rules(sweep.resources, cells, str(path))


def test_references_train_under_their_targets_dp():
    from memray.references import reference_configs

    target = validate_trial({"train": {"dp": {"epsilon": 4}}, "attacks": ["loss", {"name": "lira", "references": 4}]},
                            "x.yaml")
    references = reference_configs(target)
    assert len(references) == 4 and all(r.train.dp == target.train.dp for r in references)


def test_a_trial_without_dp_reports_its_empirical_epsilon_from_the_pool_and_the_canaries(tmp_path):
    from memray.trial import run_trial

    config = validate_trial({
        "seed": 0, "output_dir": str(tmp_path), "model": {"name": "tiny-gpt2"},
        "data": {"dataset": "pydoc", "max_length": 64, "members": 32, "nonmembers": 32, "validation": 16,
                 "canaries": {"count": 10, "repeats": [1, 4], "heldout": 10, "candidates": 100}},
        "method": {"name": "full", "lr": 0.003}, "train": {"epochs": 1, "batch_size": 8},
        "eval": {"batch_size": 32}, "attacks": ["loss"]}, "test")
    run_trial(config, trial_dir=tmp_path / "t", progress=False)
    record = json.loads((tmp_path / "t" / "result.json").read_text())
    assert "dp" not in record and record["privacy_audit"]["delta"] == pytest.approx(1 / (10 * (32 + 5 + 20)))
    assert "Steinke" in record["privacy_audit"]["canaries"]
    for row in record["epochs"]:
        assert "privacy/epsilon" not in row
        assert 0 <= row["privacy/epsilon_lb"] <= row["privacy/epsilon_lb_ceiling"]
        assert 0 <= row["privacy/epsilon_lb_canary"] <= row["privacy/epsilon_lb_canary_ceiling"]


def test_the_privacy_utility_figure_needs_a_dp_trial_and_draws_every_method(tmp_path):
    from memray.report.figures import plot_privacy_utility
    from memray.report.loading import Trial

    def trial(method: str, epsilon: float | None) -> Trial:
        final = {"epoch": 3, "val/ppl": 40.0 + (epsilon or 0), "mia/loss/auc": 0.6, "mia/loss/auc_lo": 0.55,
                 "mia/loss/auc_hi": 0.65, "privacy/epsilon_lb": 0.1}
        if epsilon is not None:
            final["privacy/epsilon"] = epsilon
        config = {"model": {"name": "gpt2"}, "data": {"dataset": "pydoc"}, "method": {"name": method},
                  "train": {"dp": {"epsilon": epsilon} if epsilon is not None else None}, "seed": 0}
        return Trial(f"{method}-{epsilon}", "", "success", None, config, {}, [final])

    plain = [trial(name, None) for name in ("full", "head")]
    assert plot_privacy_utility(plain, ["loss"], tmp_path / "none.png") is None
    path = plot_privacy_utility(plain + [trial(name, e) for name in ("full", "head") for e in (1.0, 8.0)], ["loss"],
                                tmp_path / "privacy_utility.png")
    assert path is not None and path.stat().st_size > 10_000


def test_the_dry_runs_memory_estimate_counts_torch_funcs_larger_activations():
    from memray.config import ResourceRule
    from memray.distributed import ModelShape
    from memray.sweep.planning import memory_estimate

    shape = ModelShape(params=124_439_808, hidden=768, layers=12, heads=12, vocab=50257)  # GPT-2 124M
    rule = ResourceRule(gpus=1)
    estimates = {}
    for name, method in [("lora", {"name": "lora", "rank": 8}), ("dora", {"name": "lora", "rank": 8, "dora": True})]:
        for dp_section in (None, {"epsilon": 1}):
            config = validate_trial({"model": {"name": "gpt2"}, "method": method, "train": {"dp": dp_section}}, "x.yaml")
            estimates[name, dp_section is not None] = memory_estimate(config, rule, shape)
    logits = 8 * 128 * shape.vocab * (2 + 8) / 2**30  # batch 8 x 128 tokens: not scaled by the engine
    # LoRA by Opacus: the activations of a plain pass; DoRA by torch.func: its layers' twice
    assert estimates["lora", True].activations == pytest.approx(estimates["lora", False].activations)
    assert estimates["dora", False].activations == pytest.approx(estimates["lora", False].activations)
    layers = estimates["dora", False].activations - logits
    assert estimates["dora", True].activations == pytest.approx(2 * layers + logits)


def test_a_model_torch_func_cannot_trace_gets_a_clear_error():
    class Branching(torch.nn.Module):
        """A causal LM stand-in whose forward pass branches on its input's values."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.out = torch.nn.Linear(8, 50)

        def forward(self, input_ids, attention_mask, position_ids):
            hidden = self.embed(input_ids)
            if hidden.sum() > 0:  # data-dependent control flow
                hidden = hidden * 2
            return types.SimpleNamespace(logits=self.out(hidden))

    model = Branching()
    per_sample = dp.FunctionalGradients(model, list(model.parameters()))
    with pytest.raises(dp.TorchFuncUnsupported, match=r"^train.dp: the per-sample gradients by torch.func cannot run "
                                                      r"Branching: its forward pass branches on tensor values"):
        per_sample(torch.randint(1, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long), contextlib.nullcontext())
