"""Reports: tables, figures, report.md / report.json and W&B from a sweep folder's result files.

Most tests build a synthetic but realistic sweep folder with memray.results (the trial
folder format the trial code writes): two models, four method variants (head, LoRA on
attention and on MLP at two ranks, prefix), two seeds, duplicated members and extraction
metrics, one failed trial, one unfinished trial and one grid cell not started. Its scores
are drawn so that members score higher as epochs pass, and its metrics are computed from
those scores with memray.metrics, as a trial does. The last test runs real tiny trials.
"""

import json
import re
import time
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib import image

from memray import metrics
from memray.config import ConfigError
from memray.files import load_sweep
from memray.report import build_report, label_variants, load_trials, report_command, sweep_uses_wandb
from memray.results import TrialRecord, read_result, write_scores, write_table
from memray.results import SWEEP_FILE, trial_names

from browser import drawn_share, look_at, problems

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3
ATTACKS = ("loss", "zlib")
BASE_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}
#: How fast members separate from non-members, per method label.
STRENGTH = {"head": 0.4, "lora (attn, r4)": 0.8, "lora (mlp, r8)": 1.2, "prefix": 0.2}
FAILED_CELL, RUNNING_CELL, PENDING_CELL = 5, 9, 15
MEMBERS = 60  # 48 with one copy, 6 with two, 6 with five

SWEEP = {
    "name": "synth",
    "base": {
        "model": {"name": "gpt2"},
        "data": {"dataset": "wikitext2", "max_length": 32, "members": MEMBERS, "nonmembers": MEMBERS,
                 "duplicates": {"fraction": 0.2, "copies": [2, 5]}},
        "train": {"epochs": EPOCHS},
        "attacks": list(ATTACKS),
        "extraction": {"enabled": True, "samples": 20, "prefix_tokens": 8, "suffix_tokens": 8},
    },
    "grid": {
        "model.name": ["gpt2", "gpt2-medium"],
        "method": [{"name": "head"}, {"name": "lora", "placement": "attn", "rank": 4},
                   {"name": "lora", "placement": "mlp", "rank": 8}, {"name": "prefix"}],
        "seed": [0, 1],
    },
    "wandb": {"mode": "disabled"},
}


def _label(method: dict) -> str:
    return f"lora ({method['placement']}, r{method['rank']})" if method["name"] == "lora" else method["name"]


def _method_info(model: str, method: dict) -> dict:
    base = BASE_PARAMS[model]
    trainable = {"head": 38_597_376, "lora": 147_456 * method.get("rank", 8), "prefix": 15_360}[method["name"]]
    peft = method["name"] != "head"
    # head trains an untied copy of the output layer: it adds to the total, but is not a PEFT adapter
    return {"name": method["name"], "trainable_params": trainable, "total_params": base + trainable,
            "trained": method["name"], "peft": peft, "virtual_tokens": 20 if method["name"] == "prefix" else 0,
            "lr": 1e-4}


def _epoch(rng, epoch: int, strength: float, copies: np.ndarray) -> tuple[dict, pd.DataFrame]:
    member = np.r_[np.ones(MEMBERS, bool), np.zeros(MEMBERS, bool)]
    shift = strength * epoch / EPOCHS * (1 + 0.5 * np.log2(copies))
    loss_score = rng.normal(0, 1, 2 * MEMBERS) + np.where(member, shift, 0)
    scores = {"loss": loss_score, "zlib": loss_score + rng.normal(0, 0.7, 2 * MEMBERS)}
    val_loss = 3.2 - 0.2 * epoch + 0.08 * strength * epoch**2
    row = {"epoch": epoch, "val/loss": val_loss, "val/ppl": math.exp(val_loss)}
    if epoch:
        row["train/loss"] = 3.0 - 0.3 * epoch * strength
    for label, values in scores.items():
        row.update(metrics.mia_metrics(label, values, member))
        for level in (1, 2, 5):
            chosen = member & (copies == level)
            row[f"mia/{label}/auc@dup{level}"] = metrics.roc_auc(np.r_[values[chosen], values[~member]],
                                                                 np.r_[np.ones(chosen.sum(), bool),
                                                                       np.zeros(MEMBERS, bool)])
    extracted = min(1.0, 0.1 * strength * epoch)
    row.update({"extract/exact": extracted, "extract/lcp": 8 * extracted, "extract/rougeL": 0.3 + extracted / 2,
                "extract/rougeL@0.5": extracted, "extract/samples": 20.0, "extract/nonmember/exact": 0.0,
                "extract/nonmember/rougeL": 0.3, "extract/nonmember/rougeL@0.5": 0.05,
                "extract/nonmember/samples": 20.0})
    for level in (1, 2, 5):
        row[f"extract/exact@dup{level}"] = min(1.0, extracted * level)
        row[f"extract/rougeL@0.5@dup{level}"] = min(1.0, 1.5 * extracted * level)
    frame = pd.DataFrame({"sample_id": [f"s{i}" for i in range(2 * MEMBERS)], "member": member, "copies": copies,
                          **scores})
    return row, frame


def make_sweep(directory: Path) -> Path:
    """A sweep folder as `memray run` leaves it: sweep.yaml and trials/<cell>-<slug>/."""
    sweep_dir = directory / "synth"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    _, cells = load_sweep(sweep_dir / SWEEP_FILE)
    names = trial_names(cells)
    copies = np.r_[np.ones(48, int), np.full(6, 2), np.full(6, 5), np.ones(MEMBERS, int)]
    for cell in cells:
        if cell.index == PENDING_CELL:
            continue
        config = cell.config
        method = config.method.model_dump()
        record = TrialRecord.open(sweep_dir / "trials" / names[cell.index])
        record.start(config.resolved(), config.trial_id(), cell.axes)
        record.update(split_hash="abc123", method_info=_method_info(config.model.name, method),
                      samples={"members": MEMBERS, "nonmembers": MEMBERS},
                      attack_rules={"tpr_unresolved": metrics.unresolved_fprs(MEMBERS)})
        rng = np.random.default_rng(cell.index)
        last = {FAILED_CELL: 1, RUNNING_CELL: 1}.get(cell.index, EPOCHS)
        for epoch in range(last + 1):
            row, frame = _epoch(rng, epoch, STRENGTH[_label(method)], copies)
            write_scores(record.trial_dir, epoch, frame)
            record.add_epoch(row)
        if cell.index == FAILED_CELL:
            record.finish("failed", "OutOfMemoryError: CUDA out of memory")
        elif cell.index != RUNNING_CELL:
            record.finish("success")
    return sweep_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sweep_dir = make_sweep(tmp_path_factory.mktemp("report"))
    path = build_report(sweep_dir)
    report = json.loads((path.parent / "report.json").read_text())
    return sweep_dir, path, report


def _results(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: read_result(p.parent) for p in (sweep_dir / "trials").glob("*/result.json")}


def _csv(path: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(path.parent / "tables" / f"{name}.csv", float_precision="round_trip")


def test_trials_table_numbers_equal_the_result_files(built):
    sweep_dir, path, _ = built
    results = _results(sweep_dir)
    trials = _csv(path, "trials").set_index("trial")
    assert len(trials) == 16 and set(results) < set(trials.index)
    for name, result in results.items():
        row, final = trials.loc[name], result["epochs"][-1]
        best = min(result["epochs"], key=lambda r: r["val/ppl"])
        # a trial result.json leaves `running` with no `memray run / resume` alive is lost
        assert row["status"] == ("lost" if result["status"] == "running" else result["status"])
        assert row["epochs done"] == final["epoch"] and row["epochs planned"] == EPOCHS
        assert row["final val ppl"] == final["val/ppl"]
        assert (row["best val ppl"], row["best epoch"]) == (best["val/ppl"], best["epoch"])
        for label in ATTACKS:
            assert row[f"{label} auc"] == final[f"mia/{label}/auc"]
    attacks = _csv(path, "attacks")
    assert len(attacks) == 15 * len(ATTACKS)  # every trial with an epoch, every attack
    for record in attacks.to_dict("records"):
        final = results[record["trial"]]["epochs"][-1]
        prefix = f"mia/{record['attack']}/"
        assert record["auc"] == final[prefix + "auc"]
        # 60 non-members resolve neither FPR: no TPR, and the notes say why
        assert prefix + "tpr@1%fpr" not in final and math.isnan(record["tpr@1%fpr"])
        # the interval is the one the trial recorded; chance when it holds 0.5
        assert (record["auc ci95 low"], record["auc ci95 high"]) == (final[prefix + "auc_lo"], final[prefix + "auc_hi"])
        assert record["chance"] == (record["auc ci95 low"] <= 0.5 <= record["auc ci95 high"])
    assert attacks["chance"].any() and not attacks["chance"].all()
    text = path.read_text()
    some = next(iter(results.values()))["epochs"][-1]
    assert f"{some['mia/loss/auc']:.3f}" in text and f"{some['val/ppl']:.2f}" in text
    assert "(chance)" in text and "not distinguishable from chance" in text
    # before training the synthetic scores carry no signal: most epoch-0 AUCs are marked chance
    note = next(line for line in text.splitlines() if line.startswith("> Epoch 0"))
    chance, total = map(int, note.split(": ")[1].split(" attack")[0].split(" of "))
    assert total == 15 * len(ATTACKS) and chance >= 0.8 * total
    assert "TPR@1%FPR is not reported for 15 trial(s): 60 non-members cannot resolve an FPR of 0.01" in text


def test_bootstrap_interval_agrees_with_memray_metrics(built):
    sweep_dir, path, _ = built
    attacks = _csv(path, "attacks")
    record = attacks[(attacks["status"] == "success") & (attacks["attack"] == "loss")].iloc[0]
    trial_dir = sweep_dir / "trials" / record["trial"]
    scores = pd.read_parquet(trial_dir / "scores" / f"epoch_{int(record['epoch']):03d}.parquet")
    low, high = metrics.bootstrap_auc(scores["loss"], scores["member"], n=1000, seed=1)  # against DeLong's
    assert record["auc ci95 low"] == pytest.approx(low, abs=0.025)
    assert record["auc ci95 high"] == pytest.approx(high, abs=0.025)
    assert 0.05 < record["auc ci95 high"] - record["auc ci95 low"] < 0.4  # 60 + 60 samples: a wide interval


def test_seed_means_and_method_by_model_cells(built):
    sweep_dir, path, _ = built
    results = _results(sweep_dir)
    seeds = _csv(path, "seeds")
    by_cell: dict[tuple, list[dict]] = {}
    for result in results.values():
        if result["status"] == "success":
            key = (result["config"]["model"]["name"], _label(result["config"]["method"]))
            by_cell.setdefault(key, []).append(result["epochs"][-1])
    # per attack, every configuration with two or more finished seeds (of 2 models x 4 methods)
    several = sum(len(finals) >= 2 for finals in by_cell.values())
    assert 0 < several < 8 and len(seeds) == several * len(ATTACKS)
    for record in seeds.to_dict("records"):
        finals = by_cell[(record["model"], record["method"])]
        values = [f[f"mia/{record['attack']}/auc"] for f in finals]
        assert record["finished"] == len(values)
        assert record["auc mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert len(values) >= 2
        assert record["auc std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert record["auc ci95 low"] < record["auc mean"] < record["auc ci95 high"]
        assert record["final val ppl mean"] == pytest.approx(np.mean([f["val/ppl"] for f in finals]))
    table = _csv(path, "method_by_model_wikitext2")
    assert list(table.columns) == ["metric", "method", "gpt2", "gpt2 std", "gpt2-medium", "gpt2-medium std"]
    assert set(table["metric"]) == {"val/ppl", "mia/loss/auc", "mia/zlib/auc", "extract/exact"}
    assert list(table["method"].unique()) == ["head", "lora (attn, r4)", "lora (mlp, r8)", "prefix"]
    assert table[["gpt2", "gpt2-medium"]].notna().all().all()  # every cell has a finished trial
    row = table[(table["metric"] == "mia/loss/auc") & (table["method"] == "lora (mlp, r8)")].iloc[0]
    assert row["gpt2-medium"] == pytest.approx(np.mean([f["mia/loss/auc"] for f in by_cell[("gpt2-medium", "lora (mlp, r8)")]]))
    markdown = (path.parent / "tables" / "method_by_model_wikitext2.md").read_text()
    assert "gpt2 (124M)" in markdown and "gpt2-medium (355M)" in markdown  # base sizes, adapters excluded
    assert f"{row['gpt2-medium']:.3f} ± {row['gpt2-medium std']:.3f}" in markdown


def test_failed_running_and_pending_trials_are_reported_as_such(built):
    sweep_dir, path, report = built
    _, cells = load_sweep(sweep_dir / SWEEP_FILE)
    names = trial_names(cells)
    assert report["counts"] == {"success": 13, "lost": 1, "failed": 1, "pending": 1}  # running, no driver alive
    unfinished = _csv(path, "unfinished").set_index("trial")
    assert set(unfinished.index) == {names[FAILED_CELL], names[RUNNING_CELL], names[PENDING_CELL]}
    assert unfinished.loc[names[FAILED_CELL], "reason"] == "failed: OutOfMemoryError: CUDA out of memory"
    assert unfinished.loc[names[FAILED_CELL], "epochs"] == "1/3"
    assert unfinished.loc[names[RUNNING_CELL], "reason"].startswith("lost: its process died")
    assert unfinished.loc[names[PENDING_CELL], "status"] == "pending"
    text = path.read_text()
    assert "## Trials not finished" in text and "OutOfMemoryError: CUDA out of memory" in text
    assert text.index("Trials not finished") < text.index("## Figures")  # seen first
    seeds = _csv(path, "seeds")
    failed_group = seeds[(seeds["model"] == cells[FAILED_CELL].config.model.name)
                         & (seeds["method"] == _label(cells[FAILED_CELL].config.method.model_dump()))]
    assert failed_group.empty, "one finished seed: no seed aggregate"
    assert "| 1/2 " not in (path.parent / "tables" / "seeds.md").read_text()


def _is_real_plot(path: Path) -> None:
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 400
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05
    packed = (rgb * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    assert len(np.unique(packed)) > 50  # lines, markers, text: not a blank or single-colour canvas
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.01  # more than a few non-white pixels


def test_every_figure_is_a_real_png_and_in_report_md(built):
    _, path, report = built
    expected = {"auc_vs_epoch_wikitext2", "auc_vs_model_size_wikitext2", "ppl_vs_auc", "lora_placement_rank",
                "roc_wikitext2_gpt2", "roc_wikitext2_gpt2-medium", "duplication_wikitext2", "findings"}
    assert report["tables"]["findings"]  # the findings figure draws the findings table
    assert set(report["figures"]) == expected
    text = path.read_text()
    for relative in report["figures"].values():
        figure = path.parent / relative
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _is_real_plot(figure)
        assert f"]({relative})" in text


def test_report_html_is_one_self_contained_file(built):
    _, path, report = built
    text = (path.parent / "report.html").read_text()
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', text)  # nothing fetched: no server needed
    assert text.count('src="data:image/png;base64,') == len(report["figures"])
    assert text.index('id="findings"') < text.index('id="figures"')  # notes and findings first
    assert all(note.split(":")[0] in text for note in report["notes"])
    for key in report["tables"]:
        assert f'data-table="{key}"' in text or report["tables"][key] == []


def test_a_findings_table_heads_report_html_in_place_of_the_method_by_model_tables():
    from memray.report.html import FINDINGS_TABLE, html_report
    from memray.report.tables import Table

    rows = pd.DataFrame({"finding": ["prompt-based methods stay at chance"], "evidence": ["loss AUC 0.50 [0.42, 0.58]"]})
    tables = {"unfinished": Table("unfinished", "Trials not finished", pd.DataFrame(), pd.DataFrame()),
              "method_by_model_x": Table("method_by_model_x", "Method x model size, x", rows, rows),
              FINDINGS_TABLE: Table(FINDINGS_TABLE, "Findings of the sweep", rows, rows)}
    page = html_report("s", Path("s"), {"success": 1}, tables, {}, ["a note"])
    findings = page[page.index('<section id="findings">'):page.index("</section>")]
    assert 'data-table="findings"' in findings and "loss AUC 0.50 [0.42, 0.58]" in findings
    assert 'data-table="method_by_model_x"' not in findings and 'data-table="method_by_model_x"' in page
    assert page.index("a note") < page.index('<section id="findings">')


@pytest.mark.browser
def test_report_html_in_a_browser_shows_every_figure_table_and_the_findings(built, tmp_path):
    """Headless Chromium opens report.html from disk; its screenshot has every figure
    decoded and drawn, every table and the findings drawn, and its tables sort."""
    _, path, report = built
    view = look_at(path.parent / "report.html", tmp_path)
    assert problems(view) == []
    assert len(view.probe["images"]) == len(report["figures"])
    assert {t["name"] for t in view.probe["tables"]} == {key for key, rows in report["tables"].items() if rows}
    findings = view.probe["sections"]["findings"]
    assert findings["y"] < view.probe["sections"]["figures"]["y"] and drawn_share(view.pixels, findings) > 0.01
    assert all(image["box"]["y"] > findings["y"] for image in view.probe["images"])
    assert view.probe["sorted"]
    for table in view.probe["sorted"]:  # a click on a numeric column's header sorts, a second click reverses
        assert table["ascending"] == sorted(table["ascending"]), table
        assert table["descending"] == sorted(table["descending"], reverse=True), table


@pytest.mark.browser
def test_a_figure_that_does_not_decode_fails_the_browser_check(built, tmp_path):
    _, path, _ = built
    text = (path.parent / "report.html").read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:start] + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + text[text.index('"', start):])
    found = problems(look_at(broken, tmp_path / "look"))
    assert len(found) == 1 and "not decoded (naturalWidth 0)" in found[0], found


def test_report_json_has_every_number(built):
    sweep_dir, path, report = built
    trials = {t["name"]: t for t in report["trials"]}
    for name, result in _results(sweep_dir).items():
        assert trials[name]["epochs"] == result["epochs"]  # every epoch metric as recorded
        assert trials[name]["method_info"] == result["method_info"]
    assert report["models"]["gpt2"] == {"params": BASE_PARAMS["gpt2"], "source": "trials"}
    for name in ("trials", "attacks", "seeds", "method_by_model_wikitext2", "lora", "extraction", "duplication"):
        table = _csv(path, name)
        records = report["tables"][name]
        assert len(records) == len(table)
        for record, row in zip(records, table.to_dict("records")):
            for column, value in row.items():
                if isinstance(value, float) and math.isnan(value):
                    assert record[column] is None or record[column] == ""
                elif isinstance(value, float):
                    assert record[column] == pytest.approx(value, rel=1e-12)
    success = next(t for t in report["trials"] if t["status"] == "success")
    roc = success["attacks"]["loss"]["roc"]
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and len(roc["fpr"]) == len(roc["tpr"])
    group = next(g for g in report["groups"] if len(g["finished"]) == 2)
    assert group["final"]["mia/loss/auc@dup5"]["n"] == 2


def test_lora_extraction_and_duplication_tables(built):
    sweep_dir, path, _ = built
    lora = _csv(path, "lora")
    assert set(zip(lora["placement"], lora["rank"])) == {("attn", 4), ("mlp", 8)}
    extraction = _csv(path, "extraction")
    assert set(extraction["samples of"]) == {"members", "non-members"}
    assert {"exact", "lcp", "rougeL", "rougeL@0.5", "samples"} <= set(extraction.columns)
    duplication = _csv(path, "duplication")
    assert set(duplication["copies"]) == {1, 2, 5}
    name = duplication["trial"].iloc[0]
    final = read_result(sweep_dir / "trials" / name)["epochs"][-1]
    row = duplication[(duplication["trial"] == name) & (duplication["copies"] == 5)].iloc[0]
    assert row["extract/exact"] == final["extract/exact@dup5"] and row["mia/loss/auc"] == final["mia/loss/auc@dup5"]


def test_a_copied_folder_without_sweep_file_still_reports(tmp_path, built):
    sweep_dir, _, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir / "trials", copy / "somewhere" / "trials")
    path = build_report(copy, tmp_path / "out", bootstrap=0)
    report = json.loads((path.parent / "report.json").read_text())
    assert report["counts"] == {"success": 13, "lost": 1, "failed": 1}  # no sweep.yaml: no pending cells
    assert report["sweep"]["name"] == "copy"
    # no bootstrap: the intervals the trials recorded, nothing resampled
    assert all(row["auc_ci95"] is not None for t in report["trials"] for row in t["attacks"].values())
    assert all(group["auc_ci95"][label] is None for group in report["groups"] for label in group["auc_ci95"])


def test_trials_run_before_the_config_schema_grew_still_match_their_cells(tmp_path, built):
    """A key added to the schema since the run changes the cells' trial ids and folder names:
    the old folders still belong to their cells (not pending), and the missing key is no axis."""
    sweep_dir = tmp_path / "synth"
    shutil.copytree(built[0], sweep_dir, ignore=shutil.ignore_patterns("report"))
    _, cells = load_sweep(sweep_dir / SWEEP_FILE)
    names = trial_names(cells)
    for cell in cells[:3]:  # cell 2 and not its other seed, cell 3
        old = sweep_dir / "trials" / names[cell.index]
        result = json.loads((old / "result.json").read_text())
        del result["config"]["train"]["scheduler"]  # as if written before train.scheduler existed
        (old / "result.json").write_text(json.dumps(result))
        old.rename(old.with_name(names[cell.index][:-8] + "00000000"))
    trials = load_trials(sweep_dir, cells)
    label_variants(trials)
    assert len(trials) == 16 and sum(t.status == "pending" for t in trials) == 1
    assert {t.variant for t in trials} == set(STRENGTH)


def test_trials_on_different_versions_are_flagged(tmp_path, built):
    sweep_dir = tmp_path / "synth"
    shutil.copytree(built[0], sweep_dir, ignore=shutil.ignore_patterns("report"))
    results = sorted((sweep_dir / "trials").glob("*/result.json"))
    for path in results:  # what TrialRecord.start recorded: this process's versions
        provenance = json.loads(path.read_text())["provenance"]
        assert {"memray-ft", "torch", "transformers", "peft", "datasets", "deepspeed", "ray"} <= set(provenance["versions"])
        assert provenance["python"]
    same = json.loads((build_report(sweep_dir, bootstrap=0).parent / "report.json").read_text())
    assert not any("different versions" in note for note in same["notes"])

    for path in results[:2]:  # two trials ran on another machine with an older transformers
        result = json.loads(path.read_text())
        result["provenance"]["versions"]["transformers"] = "5.0.0"
        path.write_text(json.dumps(result))
    report_md = build_report(sweep_dir, bootstrap=0)
    notes = json.loads((report_md.parent / "report.json").read_text())["notes"]
    current = json.loads(results[-1].read_text())["provenance"]["versions"]["transformers"]
    flagged = [note for note in notes if "different versions" in note]
    assert flagged == [f"Trials ran on different versions: transformers 5.0.0 (2 trials), {current} "
                       f"({len(results) - 2} trials). Install the locked set (`.ci/setup`) on every machine of a sweep."]
    assert flagged[0] in report_md.read_text()


def test_bad_folders_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        build_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no trial results"):
        build_report(tmp_path)


def test_report_command_logs_figures_to_a_wandb_report_run(tmp_path, capsys, built):
    sweep_dir = tmp_path / "synth"
    shutil.copytree(built[0], sweep_dir, ignore=shutil.ignore_patterns("report"))
    (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump({**SWEEP, "wandb": {"mode": "offline"}}, sort_keys=False))
    assert report_command(sweep_dir) == 0
    printed = capsys.readouterr().out
    assert f"report: {sweep_dir / 'report' / 'report.md'} (16 trials: 13 success, 1 failed, 1 lost, 1 pending)" in printed
    report = json.loads((sweep_dir / "report" / "report.json").read_text())
    assert report["wandb"]["logged"] and report["wandb"]["mode"] == "offline"
    (run_dir,) = (sweep_dir / "wandb").glob("offline-run-*")
    assert f"wandb sync {run_dir}" in printed
    images = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(report["figures"])
    logged = {image_file.read_bytes() for image_file in images}
    assert logged == {(sweep_dir / "report" / p).read_bytes() for p in report["figures"].values()}
    tables = list((run_dir / "files" / "media" / "table" / "report" / "table").glob("*.table.json"))
    assert {t.name.split("_")[0] for t in tables} >= {"trials", "attacks", "seeds"}
    (run_file,) = run_dir.glob("run-*.wandb")
    content = run_file.read_bytes()
    assert b"synth" in content and b"report" in content  # the sweep's group, job type report
    time.sleep(1.1)  # W&B names a run's folder by the second it starts
    assert report_command(sweep_dir) == 0  # a second report updates the same run (one id), not a new one
    assert {folder.name.rsplit("-", 1)[1] for folder in (sweep_dir / "wandb").glob("offline-run-*")} == {
        report["wandb"]["run_id"]}


def test_a_sweep_with_wandb_disabled_is_not_logged(built):
    sweep_dir, _, report = built  # built with wandb: {mode: disabled}
    assert not sweep_uses_wandb(sweep_dir) and report["wandb"] is None
    assert not (sweep_dir / "wandb").exists()


def test_report_of_a_small_real_sweep(tmp_path):
    """Three real tiny trials of the demo grid (one epoch, a few samples): two finish, one
    fails at epoch 1; the other six cells are pending."""
    from memray.files import apply_overrides, load_yaml
    from memray.trial import run_trial

    sweep_dir = tmp_path / "demo"
    sweep_dir.mkdir()
    tree = load_yaml(REPO / "sweeps" / "demo.yaml")
    tree["base"] = apply_overrides(tree["base"], {
        "train.epochs": 1, "train.checkpoints": False, "model.pretrained": False, "attacks": ["loss", "zlib", "mink"],
        "data.members": 16, "data.nonmembers": 16, "data.validation": 8, "data.max_length": 32})
    tree["wandb"] = {"mode": "disabled"}
    (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(tree, sort_keys=False))
    _, cells = load_sweep(sweep_dir / SWEEP_FILE)
    names = trial_names(cells)
    by_method = {(c.config.method.name, getattr(c.config.method, "placement", None)): c for c in cells
                 if not getattr(c.config.method, "dora", False)}
    full, lora, head = by_method[("full", None)], by_method[("lora", "attn")], by_method[("head", None)]

    def fail_after_epoch_1(epoch_metrics, checkpoint):
        if epoch_metrics["epoch"] == 1:
            raise RuntimeError("fault injected at epoch 1")

    for cell in (full, lora):
        run_trial(cell.config, trial_dir=sweep_dir / "trials" / names[cell.index], axes=cell.axes, progress=False)
    with pytest.raises(RuntimeError):
        run_trial(head.config, fail_after_epoch_1, trial_dir=sweep_dir / "trials" / names[head.index],
                  axes=head.axes, progress=False)

    path = build_report(sweep_dir, bootstrap=200)
    report = json.loads((path.parent / "report.json").read_text())
    assert report["counts"] == {"success": 2, "failed": 1, "pending": 6}
    results = _results(sweep_dir)
    trials = _csv(path, "trials").set_index("trial")
    for name, result in results.items():
        final = result["epochs"][-1]
        assert trials.loc[name, "status"] == result["status"] and trials.loc[name, "final val ppl"] == final["val/ppl"]
        for label in ("loss", "zlib", "mink"):
            assert trials.loc[name, f"{label} auc"] == final[f"mia/{label}/auc"]
    assert results[names[head.index]]["status"] == "failed"
    assert "failed: RuntimeError: fault injected at epoch 1" in path.read_text()
    attacks = _csv(path, "attacks")
    finished = attacks[attacks["status"] == "success"]
    assert len(finished) == 6 and (finished["auc ci95 low"] <= finished["auc"]).all()
    assert (finished["auc"] <= finished["auc ci95 high"]).all()
    full_info = results[names[full.index]]["method_info"]
    assert report["models"]["tiny-gpt2"] == {"params": full_info["total_params"], "source": "trials"}
    assert set(report["figures"]) == {"auc_vs_epoch_pydoc", "auc_vs_model_size_pydoc", "ppl_vs_auc",
                                      "lora_placement_rank", "roc_pydoc_tiny-gpt2", "findings"}
    for relative in report["figures"].values():
        _is_real_plot(path.parent / relative)


# ---------------------------------------------------------------------------------------
# TPR intervals, seeds of one configuration, counterfactual memorization: a second folder
# of trials (no sweep.yaml) with enough non-members to resolve both FPRs
# ---------------------------------------------------------------------------------------

TAIL_MEMBERS, TAIL_NONMEMBERS = 200, 1000
TAIL_COPIES = np.r_[np.ones(150, int), np.full(30, 2), np.full(20, 4)]  # members' copy counts


def _tail_trial(sweep_dir: Path, name: str, method: dict, seed: int, *, old: bool = False) -> Path:
    """A finished trial of two epochs with 200 members and 1,000 non-members. `old`: its
    result.json as written before the TPR intervals (no `tpr@...fpr_lo` / `_hi` keys)."""
    from memray.config import TrialConfig

    config = TrialConfig.model_validate({
        "seed": seed, "model": {"name": "gpt2"}, "method": method, "train": {"epochs": 1},
        "data": {"dataset": "wikitext2", "members": TAIL_MEMBERS, "nonmembers": TAIL_NONMEMBERS},
        "attacks": ["loss"]})
    record = TrialRecord.open(sweep_dir / "trials" / name)
    record.start(config.resolved(), config.trial_id(), {"seed": seed})
    record.update(method_info=_method_info("gpt2", method))
    rng = np.random.default_rng(seed + 10 * len(name))
    member = np.r_[np.ones(TAIL_MEMBERS, bool), np.zeros(TAIL_NONMEMBERS, bool)]
    copies = np.r_[TAIL_COPIES, np.ones(TAIL_NONMEMBERS, int)]
    for epoch in (0, 1):
        loss = rng.normal(0, 1, member.size) + np.where(member, 1.5 * epoch * np.log2(2 * copies), 0)
        row = {"epoch": epoch, "val/loss": 3.0 - 0.1 * epoch - 0.01 * seed, "val/ppl": math.exp(3.0 - 0.1 * epoch - 0.01 * seed),
               **metrics.mia_metrics("loss", loss, member)}
        if old:
            row = {key: value for key, value in row.items() if not key.endswith(("fpr_lo", "fpr_hi"))}
        frame = pd.DataFrame({"sample_id": [f"s{i}" for i in range(member.size)], "member": member,
                              "copies": copies, "loss": loss})
        if epoch and not old:  # a target with reference models: counterfactual memorization from epoch 1
            frame["counterfactual"] = rng.normal(0.05, 0.1, member.size) + np.where(member, 0.2 * np.log2(copies), 0)
            row["mem/counterfactual/mean"] = float(frame["counterfactual"].mean())
            top = frame.nlargest(20, "counterfactual")
            record.update(counterfactual_top={str(epoch): [
                {"sample_id": r.sample_id, "counterfactual": r.counterfactual, "member": bool(r.member),
                 "copies": int(r.copies)} for r in top.itertuples()]})
            write_table(record.trial_dir, "extraction", epoch, _extraction_rows(frame, rng))
        write_scores(record.trial_dir, epoch, frame)
        record.add_epoch(row)
    record.finish("success")
    return record.trial_dir


def _extraction_rows(frame: pd.DataFrame, rng) -> pd.DataFrame:
    """Extraction rows (the columns memray.extraction writes) of every 5th member and as
    many non-members: the more counterfactual memorization, the closer the continuation."""
    tried = pd.concat([frame[frame["member"]].iloc[::5], frame[~frame["member"]].iloc[:40]])
    closeness = 1 / (1 + np.exp(-8 * (tried["counterfactual"].to_numpy() - 0.1))) + rng.normal(0, 0.05, len(tried))
    return pd.DataFrame({
        "sample_id": tried["sample_id"], "member": tried["member"], "copies": tried["copies"],
        "exact": closeness > 0.8, "lcp": (8 * closeness.clip(0, 1)).round(),
        "rougeL": closeness.clip(0, 1), "bleu": (closeness - 0.2).clip(0, 1), "edit": (0.9 * closeness).clip(0, 1),
        "generated_text": "x", "suffix_text": "x"})


def make_tail_sweep(directory: Path) -> Path:
    """Three seeds of head, and one of prefix whose result.json predates the TPR intervals."""
    sweep_dir = directory / "tails"
    for seed in range(3):
        _tail_trial(sweep_dir, f"00{seed}-head-s{seed}", {"name": "head"}, seed)
    _tail_trial(sweep_dir, "003-prefix-s0", {"name": "prefix"}, 0, old=True)
    return sweep_dir


@pytest.fixture(scope="module")
def tails(tmp_path_factory):
    sweep_dir = make_tail_sweep(tmp_path_factory.mktemp("tails"))
    path = build_report(sweep_dir, bootstrap=200)
    return sweep_dir, path, json.loads((path.parent / "report.json").read_text())


def test_tprs_show_their_recorded_intervals_and_old_results_the_tpr_alone(tails):
    sweep_dir, path, report = tails
    results = _results(sweep_dir)
    attacks = _csv(path, "attacks").set_index("trial")
    for name, result in results.items():
        final, row = result["epochs"][-1], attacks.loc[name]
        for suffix in ("tpr@1%fpr", "tpr@0.1%fpr"):
            assert row[suffix] == final[f"mia/loss/{suffix}"]
            if name.endswith("prefix-s0"):  # recorded before the intervals: none is made up
                assert math.isnan(row[f"{suffix} ci95 low"]) and math.isnan(row[f"{suffix} ci95 high"])
            else:
                assert (row[f"{suffix} ci95 low"], row[f"{suffix} ci95 high"]) == (
                    final[f"mia/loss/{suffix}_lo"], final[f"mia/loss/{suffix}_hi"])
                assert row[f"{suffix} ci95 low"] <= row[suffix] <= row[f"{suffix} ci95 high"]
    markdown = (path.parent / "tables" / "attacks.md").read_text()
    head = results["000-head-s0"]["epochs"][-1]
    low, high = head["mia/loss/tpr@1%fpr_lo"], head["mia/loss/tpr@1%fpr_hi"]
    assert f"{head['mia/loss/tpr@1%fpr']:.3f} [{low:.3f}, {high:.3f}]" in markdown
    old = results["003-prefix-s0"]["epochs"][-1]
    line = next(line for line in markdown.splitlines() if "003-prefix-s0" in line)
    assert f"| {old['mia/loss/tpr@1%fpr']:.3f} " in line and "[" not in line.split("|")[8]
    trials = {t["name"]: t for t in report["trials"]}
    assert trials["000-head-s0"]["attacks"]["loss"]["tpr@1%fpr_ci95"] == [low, high]
    assert trials["003-prefix-s0"]["attacks"]["loss"]["tpr@1%fpr_ci95"] is None
    assert "Clopper-Pearson" in path.read_text()


def test_roc_figure_draws_each_reported_tpr_with_its_interval(tails, monkeypatch):
    from matplotlib.axes import Axes

    from memray.report.figures import plot_roc
    from memray.report.loading import attack_results

    sweep_dir, path, report = tails
    assert "roc_wikitext2_gpt2" in report["figures"]
    _is_real_plot(path.parent / report["figures"]["roc_wikitext2_gpt2"])
    drawn = []
    original = Axes.errorbar

    def spy(self, x, y, yerr=None, **kwargs):
        drawn.append((x[0], y[0], yerr))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    trials = load_trials(sweep_dir, [])
    label_variants(trials)
    for trial in trials:
        trial.attacks = attack_results(trial, sweep_dir, 0)
    finals = {t.variant: t.final for t in sorted(trials, key=lambda t: t.seed, reverse=True)}  # lowest seed's
    for variant in ("head", "prefix"):
        drawn.clear()
        plot_roc(trials, "wikitext2", "gpt2", [variant], path.parent / f"roc_{variant}.png")
        final = finals[variant]
        assert [(x, y) for x, y, _ in drawn] == [(0.01, final["mia/loss/tpr@1%fpr"]),
                                                 (0.001, final["mia/loss/tpr@0.1%fpr"])]
        for (x, y, yerr), suffix in zip(drawn, ("tpr@1%fpr", "tpr@0.1%fpr")):
            if variant == "prefix":
                assert yerr is None  # recorded before the intervals: the point alone
            else:  # the axes start at the 0.1% FPR: a lower bound below it is drawn there
                assert y - yerr[0][0] == pytest.approx(max(final[f"mia/loss/{suffix}_lo"], 0.001))
                assert y + yerr[1][0] == pytest.approx(final[f"mia/loss/{suffix}_hi"])


def test_seed_table_shows_mean_between_seed_sd_interval_and_seeds(tails):
    sweep_dir, path, report = tails
    results = _results(sweep_dir)
    finals = [results[f"00{seed}-head-s{seed}"]["epochs"][-1] for seed in range(3)]
    seeds = _csv(path, "seeds")
    (row,) = seeds.to_dict("records")  # prefix has one seed: no spread, not listed
    key = results["000-head-s0"]["config"]
    from memray.results import config_key

    assert row["config key"] == config_key(key) and row["n seeds"] == 3 and row["trials"] == 3
    for metric, column in (("auc", "auc"), ("tpr@1%fpr", "tpr@1%fpr"), ("tpr@0.1%fpr", "tpr@0.1%fpr")):
        values = [f[f"mia/loss/{metric}"] for f in finals]
        assert row[f"{column} mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row[f"{column} std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert row["auc ci95 low"] < row["auc mean"] < row["auc ci95 high"]
    markdown = (path.parent / "tables" / "seeds.md").read_text()
    header = markdown.splitlines()[2]
    for column in ("config", "n seeds", "AUC mean", "AUC SD", "AUC 95% CI", "TPR@1%FPR mean", "TPR@1%FPR SD"):
        assert f" {column} " in header
    assert f"| {config_key(key)} " in markdown and "| 3 of 3 " in markdown
    assert "ddof=1" in path.read_text()
    (group,) = [g for g in report["groups"] if len(g["finished"]) == 3]
    assert group["config_key"] == config_key(key) and group["final"]["mia/loss/auc"]["n"] == 3
    assert group["final"]["mia/loss/auc"]["std"] == pytest.approx(row["auc std"])
    assert group["auc_ci95"]["loss"] == [row["auc ci95 low"], row["auc ci95 high"]]


def test_counterfactual_memorization_against_copies_and_extraction(tails):
    from scipy.stats import spearmanr

    sweep_dir, path, report = tails
    table = _csv(path, "counterfactual").set_index("trial")
    assert set(table.index) == {f"00{seed}-head-s{seed}" for seed in range(3)}  # the old trial has no column
    for name, row in table.iterrows():
        trial_dir = sweep_dir / "trials" / name
        scores = pd.read_parquet(trial_dir / "scores" / "epoch_001.parquet")
        members, nonmembers = scores[scores["member"]], scores[~scores["member"]]
        assert row["epoch"] == 1 and row["members n"] == TAIL_MEMBERS
        assert row["members mean"] == pytest.approx(members["counterfactual"].mean())
        assert row["non-members mean"] == pytest.approx(nonmembers["counterfactual"].mean())
        for copies in (1, 2, 4):
            chosen = members[members["copies"] == copies]
            assert row[f"copies {copies} n"] == len(chosen) == (TAIL_COPIES == copies).sum()
            assert row[f"copies {copies} mean"] == pytest.approx(chosen["counterfactual"].mean())
        assert row["copies 1 mean"] < row["copies 2 mean"] < row["copies 4 mean"]
        rows = pd.read_parquet(trial_dir / "scores" / "extraction_epoch_001.parquet")
        tried = members.merge(rows[rows["member"]], on=["sample_id", "member", "copies"])
        assert len(tried) == 40 and row["spearman n"] == 40
        extracted = tried[tried["exact"]]
        assert row["extracted n"] == len(extracted) > 0 and row["not extracted n"] == 40 - len(extracted)
        assert row["extracted mean"] == pytest.approx(extracted["counterfactual"].mean())
        assert row["not extracted mean"] == pytest.approx(tried.loc[~tried["exact"], "counterfactual"].mean())
        best = tried[["rougeL", "bleu", "edit"]].max(axis=1)
        assert row["spearman best similarity"] == pytest.approx(spearmanr(tried["counterfactual"], best).statistic)
        assert row["spearman best similarity"] > 0.5
    text = path.read_text()
    assert "## Counterfactual memorization vs duplication and extraction" in text
    assert "counterfactual_wikitext2" in report["figures"]
    _is_real_plot(path.parent / report["figures"]["counterfactual_wikitext2"])
    assert len(report["tables"]["counterfactual"]) == 3


def test_no_counterfactual_table_or_figure_without_the_column(built):
    _, path, report = built
    assert "counterfactual" not in report["tables"] and not any("counterfactual" in f for f in report["figures"])
    assert not (path.parent / "tables" / "counterfactual.csv").exists()
    assert "Counterfactual" not in path.read_text()
