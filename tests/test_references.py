"""lira and rmia on a tiny full fine-tuning trial whose reference models `memray trial`
trains in process: the references' halves, their statistics recomputed by hand, and the
attacks' strength against LOSS."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from memray import cli, reference_attacks
from memray.config import validate_trial
from memray.references import REFERENCES_DIR, reference_configs

REFERENCES = 4
TRIAL = {
    "seed": 0,
    "model": {"name": "tiny-gpt2"},
    "data": {"dataset": "pydoc", "max_length": 48, "members": 100, "nonmembers": 100, "validation": 12},
    "method": {"name": "full", "lr": 0.003},
    "train": {"epochs": 3, "batch_size": 8, "checkpoints": False},
    "eval": {"batch_size": 50},
    "attacks": ["loss", {"name": "lira", "references": REFERENCES}, "rmia"],
}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("references")
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump({**TRIAL, "output_dir": str(tmp_path)}))
    assert cli.main(["trial", str(path), "--trial-dir", str(tmp_path / "t"), "--quiet"]) == 0
    return tmp_path / "t"


def test_reference_configs_differ_from_the_target_only_in_half_and_attacks():
    config = validate_trial(TRIAL, "test")
    references = reference_configs(config)
    assert [r.reference.index for r in references] == list(range(REFERENCES))
    assert all(r.attacks[0].name == "loss" and len(r.attacks) == 1 for r in references)
    assert all(r.method == config.method and r.train == config.train and r.data == config.data for r in references)
    assert len({r.trial_id() for r in references} | {config.trial_id()}) == REFERENCES + 1
    # a target that differs only in its other attacks shares its references
    other = validate_trial({**TRIAL, "attacks": [{"name": "rmia", "references": REFERENCES}]}, "test")
    assert [r.trial_id() for r in reference_configs(other)] == [r.trial_id() for r in references]


def test_references_train_on_their_half_and_score_the_whole_pool(target):
    scores = pd.read_parquet(target / "scores" / "epoch_003.parquet")
    pool = scores["sample_id"].tolist()
    masks = reference_attacks.half_masks(len(pool), REFERENCES, 0)
    for index in range(REFERENCES):
        folder = target / REFERENCES_DIR / f"ref{index:02d}"
        result = json.loads((folder / "result.json").read_text())
        assert result["status"] == "success" and result["config"]["reference"] == {"index": index, "of": REFERENCES}
        frame = pd.read_parquet(folder / "scores" / "epoch_003.parquet").set_index("sample_id").loc[pool]
        np.testing.assert_array_equal(frame["member"].to_numpy(), masks[index])
        assert result["samples"]["members"] == masks[index].sum()


def test_lira_and_rmia_equal_a_recomputation_from_the_per_sample_files(target):
    scores = pd.read_parquet(target / "scores" / "epoch_003.parquet")
    refs = [pd.read_parquet(target / REFERENCES_DIR / f"ref{i:02d}" / "scores" / "epoch_003.parquet")
            .set_index("sample_id").loc[scores["sample_id"]] for i in range(REFERENCES)]
    nll = np.vstack([r["nll"].to_numpy() for r in refs])
    in_mask = np.vstack([r["member"].to_numpy() for r in refs])
    # online LiRA by hand for the first sample: shared variance over every sample's in / out deviations
    phi = -nll - np.log(-np.expm1(-nll))
    phi_target = -scores["nll"].to_numpy() - np.log(-np.expm1(-scores["nll"].to_numpy()))

    def shared(mask):
        means = np.array([phi[mask[:, j], j].mean() for j in range(phi.shape[1])])
        deviations = np.concatenate([phi[mask[:, j], j] - means[j] for j in range(phi.shape[1])])
        return means, np.sqrt((deviations ** 2).sum() / (len(deviations) - phi.shape[1]))

    from scipy import stats
    (mean_in, sd_in), (mean_out, sd_out) = shared(in_mask), shared(~in_mask)
    expected = stats.norm.logpdf(phi_target[0], mean_in[0], sd_in) - stats.norm.logpdf(phi_target[0], mean_out[0], sd_out)
    assert scores["lira"].iloc[0] == pytest.approx(expected, rel=1e-9)
    # RMIA: share of pool samples whose likelihood ratio the sample's reaches
    ratio = np.exp(-scores["nll"].to_numpy()) / np.exp(-nll).mean(axis=0)
    assert scores["rmia"].iloc[0] == pytest.approx((ratio[0] >= ratio).mean())


def test_lira_and_rmia_are_at_least_as_strong_as_loss_with_intervals(target):
    result = json.loads((target / "result.json").read_text())
    final = result["epochs"][-1]
    assert result["reference_models"]["count"] == REFERENCES
    for label in ("loss", "lira", "lira-offline", "rmia", "rmia-offline"):
        assert final[f"mia/{label}/auc_lo"] <= final[f"mia/{label}/auc"] <= final[f"mia/{label}/auc_hi"], label
    # 100 non-members resolve 1% FPR
    assert final["mia/lira/tpr@1%fpr"] >= final["mia/loss/tpr@1%fpr"]
    assert final["mia/rmia/tpr@1%fpr"] >= final["mia/loss/tpr@1%fpr"]
    assert final["mia/lira/auc"] > 0.5 and final["mia/rmia/auc"] > 0.5
    # every epoch has them, epoch 0 (target = references = the base model) at chance
    assert all("mia/lira/auc" in row and "mia/rmia/auc" in row for row in result["epochs"])
    first = result["epochs"][0]
    assert first["mia/loss/auc_lo"] <= 0.5 <= first["mia/loss/auc_hi"]


def test_the_dry_run_counts_reference_models_and_their_cost(tmp_path):
    from memray.sweep import dry_run_text, trial_cost

    plain = validate_trial({**TRIAL, "attacks": ["loss"]}, "test")
    assert trial_cost(validate_trial(TRIAL, "test")) == pytest.approx((1 + REFERENCES) * trial_cost(plain))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "refs", "base": TRIAL, "grid": {"seed": [0, 1]}}))
    text = dry_run_text(path, num_cpus=2)
    assert text.splitlines()[0] == f"2 trials and {2 * REFERENCES} reference models of lira / rmia, trained in their targets' processes"
    assert text.count(f"+ {REFERENCES} reference models") == 2


def test_the_report_shows_the_target_with_lira_and_rmia_and_not_its_references(target, tmp_path):
    from memray.report import build_report

    path = build_report(target.parent, tmp_path / "report", bootstrap=0)
    report = json.loads((path.parent / "report.json").read_text())
    assert [t["name"] for t in report["trials"]] == ["t"]
    assert {"loss", "lira", "lira-offline", "rmia", "rmia-offline"} <= set(report["attacks"])
    assert all(row["auc_ci95"] is not None for row in report["trials"][0]["attacks"].values())
