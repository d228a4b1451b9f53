"""lira and rmia on a tiny full fine-tuning trial whose reference models `memray trial`
trains in process: the references' halves, their statistics recomputed by hand, and the
attacks' strength against LOSS."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from memray import cli, reference_attacks
from memray.files import validate_trial
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


def test_reference_configs_differ_from_the_target_only_in_half_seed_and_attacks():
    config = validate_trial(TRIAL, "test")
    references = reference_configs(config)
    assert [r.reference.index for r in references] == list(range(REFERENCES))
    assert all(r.attacks[0].name == "loss" and len(r.attacks) == 1 for r in references)
    assert all(r.method == config.method and r.train == config.train and r.data == config.data for r in references)
    # the split stays keyed on the target's seed; each trains from a seed of its own
    assert all(r.seed == config.seed for r in references)
    assert len({r.reference.seed for r in references} | {config.seed}) == REFERENCES + 1
    assert len({r.trial_id() for r in references} | {config.trial_id()}) == REFERENCES + 1
    # a target that differs only in its other attacks shares its references
    other = validate_trial({**TRIAL, "attacks": [{"name": "rmia", "references": REFERENCES}]}, "test")
    assert [r.trial_id() for r in reference_configs(other)] == [r.trial_id() for r in references]


def test_references_train_like_the_target_on_their_half_topped_up_and_score_the_whole_pool(target):
    target_result = json.loads((target / "result.json").read_text())
    scores = pd.read_parquet(target / "scores" / "epoch_003.parquet")
    pool = scores["sample_id"].tolist()
    masks = reference_attacks.half_masks(len(pool), REFERENCES, 0)
    assert (masks.sum(axis=0) == REFERENCES // 2).all()
    seeds = set()
    for index in range(REFERENCES):
        folder = target / REFERENCES_DIR / f"ref{index:02d}"
        result = json.loads((folder / "result.json").read_text())
        section = result["config"]["reference"]
        assert result["status"] == "success" and (section["index"], section["of"]) == (index, REFERENCES)
        frame = pd.read_parquet(folder / "scores" / "epoch_003.parquet").set_index("sample_id").loc[pool]
        np.testing.assert_array_equal(frame["member"].to_numpy(), masks[index])
        # as many training texts as the target: its half of the pool, topped up from outside it
        assert result["samples"]["train_texts"] == target_result["samples"]["train_texts"] == 100
        made_of = result["reference_data"]
        assert made_of["pool_samples"] == masks[index].sum() == 100 and made_of["texts"] == 100
        assert made_of["pool_texts"] + made_of["top_up_texts"] == 100
        assert made_of["seed"] == section["seed"] != 0 and made_of["target_seed"] == 0
        seeds.add(section["seed"])
    assert len(seeds) == REFERENCES


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
    for label in ("lira", "lira-offline", "rmia", "rmia-offline"):
        assert final[f"mia/{label}/tpr@1%fpr"] >= final["mia/loss/tpr@1%fpr"], label
    # offline RMIA with its calibrated a is not LOSS relabelled
    scores = pd.read_parquet(target / "scores" / "epoch_003.parquet")
    assert stats.spearmanr(scores["rmia-offline"], scores["loss"]).statistic <= 0.95
    assert final["mia/lira/auc"] > 0.5 and final["mia/rmia/auc"] > 0.5
    # every epoch after the first has them; epoch 0 (target = the base model) has none, with the reason
    assert all("mia/lira/auc" in row and "mia/rmia/auc" in row for row in result["epochs"][1:])
    first = result["epochs"][0]
    assert not any(key.startswith(("mia/lira", "mia/rmia")) for key in first)
    assert "base model" in result["reference_models"]["rules"]["epoch_0"]
    assert first["mia/loss/auc_lo"] <= 0.5 <= first["mia/loss/auc_hi"]
    # offline RMIA's a calibrated per epoch on the references, recorded; LiRA's variance model too
    rules = result["reference_models"]["epochs"]["3"]["rules"]
    assert 0 <= rules["rmia-offline"]["offline_a"] <= 1 and rules["lira"]["variance"] == "pooled"


def test_the_dry_run_lists_reference_models_as_trials_of_their_own(tmp_path):
    from memray.sweep import dry_run_text

    path = tmp_path / "sweep.yaml"
    # two seeds: references of their own; two attack lists per seed: shared references
    grid = {"seed": [0, 1], "attacks": [TRIAL["attacks"], ["zlib", {"name": "rmia", "references": REFERENCES}]]}
    path.write_text(yaml.safe_dump({"name": "refs", "base": TRIAL, "grid": grid}))
    lines = dry_run_text(path, num_cpus=2).splitlines()
    assert lines[0] == f"{4 + 2 * REFERENCES} trials ({2 * REFERENCES} of them reference models of lira / rmia, " \
                       "shared by the targets that need the same)"
    trial_lines = [line for line in lines if line.startswith("  0")]
    assert len(trial_lines) == 4 + 2 * REFERENCES
    assert sum("_ref" in line and "reference=" in line for line in trial_lines) == 2 * REFERENCES
    # the per-GPU-type table counts them as trials (their cost is a target's)
    assert any(line.split()[:1] == ["CPU"] and line.split()[2] == str(4 + 2 * REFERENCES) for line in lines)


def test_the_report_shows_the_target_with_lira_and_rmia_and_not_its_references(target, tmp_path):
    from memray.report import build_report

    path = build_report(target.parent, tmp_path / "report", bootstrap=0)
    report = json.loads((path.parent / "report.json").read_text())
    assert [t["name"] for t in report["trials"]] == ["t"]
    assert {"loss", "lira", "lira-offline", "rmia", "rmia-offline"} <= set(report["attacks"])
    assert all(row["auc_ci95"] is not None for row in report["trials"][0]["attacks"].values())


def test_over_three_seeds_reference_attacks_beat_loss_at_low_fpr(target, tmp_path):
    """The issue's bar, on the tiny full fine-tuning trial with 100 scored non-members and 4
    references, seeds 0 (the module's trial) to 2: the mean TPR at 1% FPR of lira and rmia,
    online and offline, above LOSS's; offline RMIA's scores never rank as LOSS's (Spearman
    <= 0.95); every reference trained on the target's training-set size with a seed of its
    own. Measured here: LOSS .25/.40/.47, lira .95/1.0/.99, lira-offline .83/.82/.34, rmia
    .99/1.0/.99, rmia-offline .85/.91/.33."""
    tprs: dict[str, list[float]] = {}
    for seed in (0, 1, 2):
        folder = target if seed == 0 else tmp_path / f"s{seed}"
        if seed:
            path = tmp_path / f"trial{seed}.yaml"
            path.write_text(yaml.safe_dump({**TRIAL, "seed": seed, "output_dir": str(tmp_path)}))
            assert cli.main(["trial", str(path), "--trial-dir", str(folder), "--quiet"]) == 0
        result = json.loads((folder / "result.json").read_text())
        for label in ("loss", "lira", "lira-offline", "rmia", "rmia-offline"):
            tprs.setdefault(label, []).append(result["final"][f"mia/{label}/tpr@1%fpr"])
        scores = pd.read_parquet(folder / "scores" / "epoch_003.parquet")
        assert stats.spearmanr(scores["rmia-offline"], scores["loss"]).statistic <= 0.95
        for index in range(REFERENCES):
            reference = json.loads((folder / REFERENCES_DIR / f"ref{index:02d}" / "result.json").read_text())
            assert reference["samples"]["train_texts"] == result["samples"]["train_texts"]
            assert reference["reference_data"]["seed"] not in (0, 1, 2)
    print("TPR@1%FPR over seeds 0-2:", {label: [round(v, 3) for v in values] for label, values in tprs.items()})
    for label in ("lira", "lira-offline", "rmia", "rmia-offline"):
        assert np.mean(tprs[label]) > np.mean(tprs["loss"]), (label, tprs)


SWEEP_TRIAL = {**TRIAL, "data": {**TRIAL["data"], "members": 40, "nonmembers": 40},
               "train": {**TRIAL["train"], "epochs": 2}, "extraction": {"enabled": False}}
SWEEP_ATTACKS = [["loss", {"name": "lira", "references": REFERENCES}, "rmia"],
                 ["zlib", {"name": "rmia", "references": REFERENCES}]]


@pytest.mark.ray
def test_a_sweep_trains_reference_models_as_trials_and_completes_its_targets(tmp_path):
    """Two targets that differ only in attacks share four reference models, which Ray runs as
    trials of their own; the driver then adds lira / rmia to both targets, per epoch, in
    result.json, the per-sample files and W&B; a resume touches nothing."""
    from sklearn.metrics import roc_auc_score

    from helpers import file_states, trial_dirs, wandb_records
    from memray.sweep import resume_sweep, run_sweep, sweep_status
    from memray.sweep.wandb import wandb_run_id

    path = tmp_path / "refs.yaml"
    path.write_text(yaml.safe_dump({"name": "refs", "base": SWEEP_TRIAL, "grid": {"attacks": SWEEP_ATTACKS},
                                    "wandb": {"mode": "offline"}}))
    assert run_sweep(path, storage=str(tmp_path / "out"), num_cpus=2) == 0
    folder = tmp_path / "out" / "refs"
    dirs = trial_dirs(folder)
    results = {index: json.loads((d / "result.json").read_text()) for index, d in dirs.items()}
    assert len(dirs) == 2 + REFERENCES and all(r["status"] == "success" for r in results.values())
    references = [i for i, r in results.items() if r["config"]["reference"]]
    assert [(results[i]["config"]["reference"]["index"], results[i]["config"]["reference"]["of"])
            for i in references] == [(i, REFERENCES) for i in range(REFERENCES)]
    expected_folders = [f"../{dirs[i].name}" for i in references]

    state = json.loads((folder / "sweep.json").read_text())
    for target in (0, 1):
        result, labels = results[target], ("rmia", "rmia-offline") + (("lira", "lira-offline") if target == 0 else ())
        assert result["reference_models"]["folders"] == expected_folders
        assert not any(key.startswith("mia/rmia") for key in result["epochs"][0])  # epoch 0: the base model
        for row in result["epochs"][1:]:
            epoch = row["epoch"]
            scores = pd.read_parquet(dirs[target] / "scores" / f"epoch_{epoch:03d}.parquet")
            refs = [pd.read_parquet(dirs[i] / "scores" / f"epoch_{epoch:03d}.parquet").set_index("sample_id")
                    .loc[scores["sample_id"]] for i in references]
            # online RMIA by hand: the share of the pool whose likelihood ratio each sample's reaches
            ratio = np.exp(-scores["nll"].to_numpy()) / np.mean([np.exp(-r["nll"].to_numpy()) for r in refs], axis=0)
            np.testing.assert_allclose(scores["rmia"], (ratio[:, None] >= ratio[None, :]).mean(axis=1))
            for label in labels:
                assert row[f"mia/{label}/auc"] == pytest.approx(roc_auc_score(scores["member"], scores[label]))
        if target == 1:  # its attacks have no lira
            assert not any(key.startswith("mia/lira") for row in result["epochs"] for key in row)
        # W&B: every epoch's lira / rmia, against its epoch, beside the epoch's own row
        rows = []
        for run_file in folder.glob(f"wandb/*run-*-{wandb_run_id(state['uid'], target)}/run-*.wandb"):
            for record in wandb_records(run_file):
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        late = {row["reference_epoch"]: row for row in rows if "mia/rmia/auc" in row}
        assert sorted(late) == [1, 2]  # epoch 0 (the base model) has none
        assert all(late[e]["mem/counterfactual/mean"] == pytest.approx(result["epochs"][e]["mem/counterfactual/mean"])
                   for e in late)
        # the table of the samples of highest counterfactual memorization, against the last epoch
        tables = [row for row in rows if "mem/counterfactual/top/nrows" in row]
        assert [(row["reference_epoch"], row["mem/counterfactual/top/nrows"]) for row in tables] == [(2, 20)]
        assert all(late[e]["mia/rmia/auc"] == pytest.approx(result["epochs"][e]["mia/rmia/auc"]) for e in late)
        # the epochs themselves, once each (the late rows carry their epoch as reference_epoch)
        assert sorted(row["epoch"] for row in rows if "epoch" in row) == [0, 1, 2]

    status = sweep_status(folder)
    assert "refs (" in status and "2 trials: 2 success" in status
    assert f"{REFERENCES} reference models of lira / rmia: {REFERENCES} success" in status

    from memray.report import build_report

    report = json.loads((build_report(folder, tmp_path / "report", bootstrap=0).parent / "report.json").read_text())
    assert sorted(t["name"] for t in report["trials"]) == sorted(dirs[i].name for i in (0, 1))  # targets only
    assert {"lira", "rmia", "rmia-offline"} <= set(report["attacks"])

    before = {index: file_states(d) for index, d in dirs.items()}
    assert resume_sweep(folder, num_cpus=2) == 0
    assert {index: file_states(d) for index, d in dirs.items()} == before


def _synthetic_sweep(root, storage_uri: str | None):
    """Trial folders of a finished target and its two references, as a sweep leaves them
    (result.json, per-sample scores of epochs 0-1), without training anything: the target's
    members have a lower loss than the references that left them out."""
    from memray.config import Cell
    from memray.references import sweep_cells
    from memray.results import trial_names
    from memray.sweep.context import SweepContext
    from memray.sweep.storage import SweepFolder
    from memray.sweep.wandb import WandbSettings

    base = validate_trial({**SWEEP_TRIAL, "attacks": ["loss", {"name": "rmia", "references": REFERENCES}]}, "test")
    cells = sweep_cells([Cell(index=0, axes={}, config=base)])
    names = trial_names(cells)
    location = storage_uri or str(root)
    local_root = root / "scratch" if storage_uri else root
    rng = np.random.default_rng(0)
    ids, member = np.arange(80), np.arange(80) < 40
    for cell in cells:
        folder = local_root / "trials" / names[cell.index]
        (folder / "scores").mkdir(parents=True)
        epochs = []
        for epoch in (0, 1):
            if cell.config.reference is None:
                nll, in_half = 3.0 - 0.5 * epoch * member + rng.normal(0, 0.1, 80), member
            else:
                in_half = reference_attacks.half_masks(80, REFERENCES, 0)[cell.config.reference.index]
                nll = 3.0 - 0.5 * epoch * in_half + rng.normal(0, 0.1, 80)
            pd.DataFrame({"sample_id": ids, "member": in_half, "copies": in_half.astype(int), "nll": nll,
                          "loss": -nll}).to_parquet(
                folder / "scores" / f"epoch_{epoch:03d}.parquet")
            epochs.append({"epoch": epoch, "val/ppl": 20.0})
        (folder / "result.json").write_text(json.dumps({"status": "success", "config": cell.config.resolved(),
                                                        "trial_id": cell.config.trial_id(), "finished": 1.0,
                                                        "epochs": epochs}))
    if storage_uri:  # the storage holds the mirrored folders; the driver's scratch has none
        import shutil

        shutil.copytree(local_root / "trials", root / "bucket" / "trials")
        shutil.rmtree(local_root)
    context = SweepContext(folder=SweepFolder(location), name="synthetic", cells={c.index: c for c in cells},
                           trial_names=names, wandb=WandbSettings("disabled", "p", None, "synthetic", "u"),
                           local_root=str(local_root), cache_dir=str(root / "cache"), workdir=str(root))
    return context, names


@pytest.mark.parametrize("storage", ["path", "uri"])
def test_the_driver_completes_a_target_once_on_path_and_uri_storage(tmp_path, storage):
    from memray.sweep.completion import complete_targets

    uri = f"file://{tmp_path / 'bucket'}" if storage == "uri" else None
    context, names = _synthetic_sweep(tmp_path, uri)
    trials = (tmp_path / "bucket" if uri else tmp_path) / "trials"
    target = trials / names[0]
    # a reference still running: nothing yet
    ref = trials / names[2] / "result.json"
    running = json.loads(ref.read_text())
    ref.write_text(json.dumps({**running, "status": "running"}))
    assert complete_targets(context) == []
    ref.write_text(json.dumps(running))

    assert complete_targets(context) == [names[0]]
    result = json.loads((target / "result.json").read_text())
    assert result["reference_models"]["folders"] == [f"../{names[i]}" for i in range(1, 1 + REFERENCES)]
    assert [row["epoch"] for row in result["epochs"] if "mia/rmia/auc" in row] == [1]  # none at epoch 0
    scores = pd.read_parquet(target / "scores" / "epoch_001.parquet")
    assert "rmia" in scores and "rmia-offline" in scores
    # epoch 1: the members' lower loss against references that left half of them out
    assert result["epochs"][1]["mia/rmia/auc"] > 0.9
    # counterfactual memorization: the references fit their own half 0.5 nats better
    assert (scores["counterfactual"] > 0).all() and scores["counterfactual"].mean() == pytest.approx(0.5, abs=0.05)
    assert result["epochs"][1]["mem/counterfactual/mean"] == pytest.approx(0.5, abs=0.05)
    top = result["counterfactual_top"]["1"]
    assert len(top) == 20 and top[0]["counterfactual"] == scores["counterfactual"].max()
    assert [t["counterfactual"] for t in top] == sorted((t["counterfactual"] for t in top), reverse=True)
    before = (target / "result.json").stat().st_mtime_ns
    assert complete_targets(context) == []  # done once: the folder stays as it is
    assert (target / "result.json").stat().st_mtime_ns == before

    # a reference trained again (same folder, new result) rescores its target
    retrained = json.loads(ref.read_text())
    ref.write_text(json.dumps({**retrained, "finished": 2.0}))
    assert complete_targets(context) == [names[0]]
    # so do other reference-attack rules (an older memray's), without retraining anything
    result = json.loads((target / "result.json").read_text())
    result["reference_models"]["rules"] = {**result["reference_models"]["rules"], "version": 1}
    result["epochs"][0]["mia/rmia/auc"] = 0.5  # what an older memray added at epoch 0
    (target / "result.json").write_text(json.dumps(result))
    assert complete_targets(context) == [names[0]]
    result = json.loads((target / "result.json").read_text())
    assert "mia/rmia/auc" not in result["epochs"][0] and complete_targets(context) == []


def _split(members: list[tuple[str, int]], nonmembers: list[str]):
    from memray.data import Sample, _split

    return _split([Sample(i, f"text {i}", c) for i, c in members], [Sample(i, f"text {i}", 0) for i in nonmembers],
                  [Sample("v", "validation", 0)], None)


def test_a_reference_split_is_its_half_with_the_targets_copies_topped_up_to_the_targets_size():
    from memray.data import Sample, reference_split

    # target: members m0 (3 copies), m1..m5; the pool is m0..m3 (scored) and n0..n3; m4, m5 unscored
    split = _split([("m0", 3)] + [(f"m{i}", 1) for i in range(1, 6)], [f"n{i}" for i in range(5)])
    pool = split.members[:4] + split.nonmembers[:4]
    in_half = [True, False, True, False, True, False, True, False]  # m0, m2, n0, n2
    asked = []
    found = reference_split(split, pool, in_half, texts=10, seed=7,
                            more=lambda count: asked.append(count) or [Sample(f"x{i}", f"extra {i}", 1) for i in range(count)])
    members = found.split.members
    assert [s.id for s in members[:found.pool_in]] == ["m0", "m2", "n0", "n2"]
    assert [s.copies for s in members[:found.pool_in]] == [3, 1, 1, 1]  # the target's copies; its non-members once
    assert sum(s.copies for s in members) == 10 == len(found.split.training_texts())
    top_up = [s.id for s in members[found.pool_in:]]
    # the target's unscored members first (m4, m5), then its unscored non-member (n4), then the dataset's
    assert set(top_up[:2]) == {"m4", "m5"} and top_up[2] == "n4" and top_up[3].startswith("x") and len(top_up) == 4
    assert asked == [4]  # the dataset asked only because the target's own samples fell short
    assert [s.id for s in found.split.nonmembers] == ["m1", "m3", "n1", "n3"]
    assert found.composition == {"pool_samples": 4, "pool_texts": 6, "top_up_samples": len(top_up),
                                 "top_up_texts": 4, "texts": 10}
    assert not set(top_up) & {s.id for s in pool}


def test_a_reference_split_the_dataset_cannot_supply_names_the_sizes():
    from memray.data import reference_split
    from memray.schema import ConfigError

    split = _split([("m0", 5), ("m1", 1)], ["n0", "n1"])
    pool = split.members + split.nonmembers
    with pytest.raises(ConfigError, match=r"data.members: .*as many texts as the target \(6\).*gives 2.*only 0 more"):
        reference_split(split, pool, [False, True, True, False], texts=6, seed=0, more=lambda count: [])
    with pytest.raises(ConfigError, match=r"data.nonmembers: .*4 samples \(8 texts.*more than the target's 6"):
        reference_split(split, pool, [True, True, True, True], texts=6, seed=0, more=lambda count: [])


def test_a_target_whose_references_the_dataset_cannot_supply_is_refused_before_training(tmp_path, capsys):
    """Members with duplicates need references topped up from outside the audit pool; a
    local file with nothing outside it: exit 2 naming the sizes, before any model trains."""
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"line {i} of a small local file with a few words\n" for i in range(21)))
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "tiny-gpt2"}, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "local", "path": str(texts), "members": 10, "nonmembers": 10, "validation": 1,
                 "max_length": 16, "duplicates": {"fraction": 0.5, "copies": [3]}},
        "attacks": ["loss", {"name": "lira", "references": 4}]}))
    assert cli.main(["trial", str(path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "data.members: a reference model of lira / rmia trains on as many texts as the target (20)" in error
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_references_share_the_targets_overlap_filtered_split_and_top_up_past_its_redraws():
    """With data.overlap_filter, a reference model is made from the target's filtered split
    (its pool: the target's filtered non-members), carries the filter's record, and its
    top-up from the dataset starts after the samples the filter read."""
    from memray import data, models, reference_attacks as ra
    from memray.config import ModelConfig

    raw = {**TRIAL, "data": {**TRIAL["data"], "members": 32, "nonmembers": 32,
                             "overlap_filter": {"ngram": 7, "threshold": 0.2}}}
    config = validate_trial(raw, "test")
    assert all(r.data == config.data for r in reference_configs(config))  # the same filter, the same split
    tokenizer = models.load_tokenizer(ModelConfig(name="tiny-gpt2"))
    split = data.load_split(config.data, config.seed, tokenizer)
    assert split.overlap_filter["dropped"] > 0  # pydoc's blocks overlap: the filter redraws some
    pool = split.members + split.nonmembers
    spare = data.spare_samples(config.data, config.seed, tokenizer, 200)
    found = data.reference_split(split, pool, ra.half_masks(len(pool), REFERENCES, config.seed)[0], 100, 1,
                                 lambda count: spare[:count])
    assert found.split.overlap_filter == split.overlap_filter
    assert {s.id for s in found.split.nonmembers} <= {s.id for s in pool}
    top_up = {s.id for s in found.split.members[found.pool_in:]}
    assert top_up and not top_up & {s.id for s in split.members + split.nonmembers + split.validation}


def test_a_trials_spare_samples_are_read_once_for_its_references_and_dcpdd(monkeypatch):
    """The references' top-ups and DC-PDD's frequency texts both take the dataset's spare
    samples; each read rebuilds the dataset's pool, so one trial reads them once."""
    from memray import data, trial

    reads = []

    def spare_samples(config, seed, tokenizer, count, source="config"):
        reads.append(count)
        return [data.Sample(f"s{i}", f"text {i}", 1) for i in range(min(count, available))]

    monkeypatch.setattr(data, "spare_samples", spare_samples)
    config = validate_trial({"model": {"name": "tiny-gpt2"}, "attacks": ["loss", "dcpdd"]}, "x.yaml")
    monkeypatch.setattr(trial.models, "pretraining_texts", lambda model: None)  # e.g. a hub model
    available = 10_000
    spare = trial._SpareSamples(config, None, "x.yaml", most=max(300, trial.FREQUENCY_SAMPLES))
    top_ups = [spare(300), spare(120)]  # two references' top-ups
    what, texts = trial._frequency_texts(config, spare)()
    assert reads == [trial.FREQUENCY_SAMPLES] and len(texts) == trial.FREQUENCY_SAMPLES
    assert top_ups[1] == top_ups[0][:120] and texts[:300] == [s.text for s in top_ups[0]]
    assert "outside members, non-members and validation" in what
    spare(trial.FREQUENCY_SAMPLES + 1)  # more than the first read took: read again
    assert reads == [trial.FREQUENCY_SAMPLES, trial.FREQUENCY_SAMPLES + 1]

    reads.clear()
    available = 50  # the pool ran out at 50: a larger ask finds no more, and is not read again
    spare = trial._SpareSamples(config, None, "x.yaml", most=100)
    assert len(spare(100)) == 50 and len(spare(500)) == 50 and reads == [100]


def test_status_tells_targets_waiting_for_references_from_those_the_driver_has_yet_to_score(tmp_path):
    from memray.sweep import sweep_status
    from memray.sweep.completion import complete_targets

    context, names = _synthetic_sweep(tmp_path, None)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "synthetic", "base": {**SWEEP_TRIAL, "attacks": ["loss", {"name": "rmia", "references": REFERENCES}]}}))
    (tmp_path / "sweep.json").write_text(json.dumps({"uid": "u"}))
    waiting, unscored = "get lira / rmia when their reference models have finished", "lack their lira / rmia"
    ref = tmp_path / "trials" / names[2] / "result.json"
    finished = json.loads(ref.read_text())
    ref.write_text(json.dumps({**finished, "status": "running"}))
    status = sweep_status(tmp_path)
    assert f"1 finished trial(s) {waiting}" in status and unscored not in status
    ref.write_text(json.dumps(finished))
    status = sweep_status(tmp_path)  # references done, the target not yet scored with them
    assert waiting not in status and f"1 finished trial(s) whose reference models have all finished {unscored}" in status
    assert "`memray resume` adds them" in status  # no driver alive on the folder
    assert complete_targets(context) == [names[0]]
    status = sweep_status(tmp_path)
    assert waiting not in status and unscored not in status
    target = tmp_path / "trials" / names[0] / "result.json"
    result = json.loads(target.read_text())  # scored under an older memray's rules: rescored by the driver
    result["reference_models"]["rules"] = {**result["reference_models"]["rules"], "version": 1}
    target.write_text(json.dumps(result))
    assert unscored in sweep_status(tmp_path)
