"""The extension points' registries: every list memray shows is derived from them, a name
cannot be registered twice, and a new attack changes no existing trial's id."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from memray import attacks, cli, config, methods
from memray.config import ConfigError, TrialConfig
from memray.files import validate_trial


def test_the_schema_and_the_cli_list_every_registered_method_and_attack():
    assert config.METHODS == methods.METHODS.names()
    assert config.ATTACKS == attacks.ATTACKS.names()
    for name in methods.METHODS:  # the trial schema accepts each, with its own section
        assert isinstance(TrialConfig(method={"name": name}).method, methods.METHODS[name].config)
    parser = argparse.ArgumentParser()
    cli.bench_arguments(parser)
    assert parser.parse_args([]).methods.split(",") == list(methods.METHODS)
    with pytest.raises(ConfigError, match=f"is not one of {', '.join(methods.METHODS)}"):
        validate_trial({"method": {"name": "qlora"}}, "s.yaml")


def test_sweep_planning_costs_every_registered_method():
    from memray.sweep import trial_cost

    costs = {name: trial_cost(TrialConfig(method={"name": name})) for name in methods.METHODS}
    assert all(cost > 0 for cost in costs.values())
    assert costs["head"] < costs["lora"] < costs["full"]  # a shorter backward pass costs less


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="method 'lora' is already registered"):
        methods.register(methods.METHODS["lora"])
    with pytest.raises(ValueError, match="attack 'loss' is already registered"):
        attacks.attack("loss")(attacks.loss_score)
    assert methods.METHODS["lora"].name == "lora" and attacks.ATTACKS["loss"].score is attacks.loss_score


def test_a_spec_whose_schema_has_another_name_is_refused():
    spec = methods.METHODS["lora"]
    with pytest.raises(ValueError, match="method 'lora2': its config's name defaults to 'lora'"):
        methods.register(dataclasses.replace(spec, name="lora2"))
    assert "lora2" not in methods.METHODS


def test_every_method_has_a_family_and_an_unknown_family_is_refused():
    families = {name: methods.METHODS[name].family for name in methods.METHODS}
    assert set(families.values()) == set(methods.METHOD_FAMILIES)  # both families are represented
    assert families["lora"] == "parameter-based" and families["prefix"] == "prompt-based"
    spec = methods.METHODS["lora"]
    with pytest.raises(ValueError, match="method 'lora': family 'adapter' is not one of parameter-based, prompt-based"):
        methods.register(dataclasses.replace(spec, family="adapter"))
    with pytest.raises(ValueError, match="method 'lora': FLOP class 'cheap' is not one of all-weights, output-layer"):
        methods.register(dataclasses.replace(spec, flop_class="cheap"))
    with pytest.raises(ValueError, match="method 'lora': 'full' is already the default method"):
        methods.register(spec, default=True)
    assert methods.METHODS["lora"] is spec


@pytest.fixture
def extra_attack():
    """A throw-away attack registered for one test: the negative maximum token loss."""
    attacks.attack("maxloss")(lambda attack, target, text, reference: float(target.logprobs.min()))
    yield "maxloss"
    attacks.ATTACKS.remove("maxloss")


def test_a_new_attack_changes_no_existing_trial_id(extra_attack):
    before = {"default": "709b805a",  # the default trial's id under the papers' attack rules
              "lora": TrialConfig(method={"name": "lora"}).trial_id()}
    assert TrialConfig().trial_id() == before["default"]
    assert [a.name for a in TrialConfig().attacks] == list(config.DEFAULT_ATTACKS)  # not extended
    assert TrialConfig(method={"name": "lora"}).trial_id() == before["lora"]
    listed = TrialConfig(attacks=["loss", extra_attack])  # a config that lists it runs it
    assert [a.label for a in listed.attacks] == ["loss", "maxloss"]
    with pytest.raises(ConfigError, match="k is only used by mink and mink\\+\\+, not maxloss"):
        validate_trial({"attacks": [{"name": extra_attack, "k": 0.1}]}, "s.yaml")
