"""memray.data: dataset loading, the seeded member / non-member split, duplication."""

import collections
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import huggingface_hub.constants
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from memray import data as data_module
from memray.config import ConfigError, DataConfig
from memray.data import load_split, pydoc_texts, synthetic_texts

from hub_replica import HubReplica


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (vocab 500) trained on the pydoc pretrain part: offline, ~1 s."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pydoc_texts("pretrain"), vocab_size=500, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def all_samples(split):
    return split.members + split.nonmembers + split.validation


# ---------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------


def test_pydoc_parts_are_disjoint_non_empty_and_cover_every_topic():
    from pydoc_data.topics import topics

    pretrain, finetune = pydoc_texts("pretrain"), pydoc_texts("finetune")
    assert pretrain and finetune
    assert not set(pretrain) & set(finetune)
    assert len(pretrain) + len(finetune) == len(topics)
    assert pydoc_texts("finetune") == finetune
    assert all("\n" not in t and "  " not in t and t == t.strip() for t in pretrain + finetune)
    with pytest.raises(ValueError):
        pydoc_texts("test")


def test_pydoc_split_draws_token_blocks_from_the_finetune_part_only(tokenizer):
    split = load_split(DataConfig(dataset="pydoc", max_length=64, members=50, validation=20), 0, tokenizer)
    assert (len(split.members), len(split.nonmembers), len(split.validation)) == (50, 50, 20)
    finetune_text = " ".join(pydoc_texts("finetune"))
    pretrain_words = " ".join(pydoc_texts("pretrain")).split()
    pretrain_runs = {tuple(pretrain_words[i:i + 13]) for i in range(len(pretrain_words) - 12)}
    for sample in all_samples(split):
        assert sample.id.startswith("pydoc/")
        assert sample.text in finetune_text
        words = sample.text.split()
        assert not any(tuple(words[i:i + 13]) in pretrain_runs for i in range(len(words) - 12))
        assert 16 <= n_tokens(tokenizer, sample.text) <= 64 + 2



def test_synthetic_pool_is_deterministic_and_unique():
    texts = synthetic_texts()
    assert texts == synthetic_texts()
    assert len(texts) == len(set(texts)) >= 5000
    names = [t.split(" | ")[0] for t in texts]
    assert len(set(names)) == len(names)
    assert texts[0].startswith("Name: ") and " | Born: " in texts[0] and "@" in texts[0]


# ---------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------


def test_split_is_disjoint_sized_and_reproducible(tokenizer):
    config = DataConfig(dataset="synthetic", members=120, nonmembers=80, validation=30)
    split = load_split(config, 7, tokenizer)
    assert (len(split.members), len(split.nonmembers), len(split.validation)) == (120, 80, 30)
    ids = [s.id for s in all_samples(split)]
    texts = [s.text for s in all_samples(split)]
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    assert all(s.copies == 1 for s in split.members)
    assert all(s.copies == 0 for s in split.nonmembers + split.validation)

    again = load_split(config, 7, tokenizer)
    assert again == split and len(split.split_hash) == 64
    other = load_split(config, 8, tokenizer)
    assert other.split_hash != split.split_hash
    assert {s.id for s in other.members} != {s.id for s in split.members}
    assert load_split(config, -7, tokenizer).split_hash not in (split.split_hash, other.split_hash)


def test_split_seed_overrides_the_trial_seed(tokenizer):
    config = DataConfig(dataset="synthetic", members=20, validation=5, split_seed=3)
    assert load_split(config, 0, tokenizer) == load_split(config, 1, tokenizer)
    assert load_split(config, 0, tokenizer) != load_split(config.model_copy(update={"split_seed": None}), 0, tokenizer)


def test_members_do_not_depend_on_the_held_out_sizes(tokenizer):
    small = load_split(DataConfig(dataset="synthetic", members=30, nonmembers=10, validation=5), 0, tokenizer)
    large = load_split(DataConfig(dataset="synthetic", members=30, nonmembers=60, validation=40), 0, tokenizer)
    assert small.members == large.members
    assert small.split_hash != large.split_hash


def test_default_sizes(tokenizer):
    split = load_split(DataConfig(dataset="synthetic", validation=10), 0, tokenizer)
    assert (len(split.members), len(split.nonmembers), len(split.validation)) == (200, 200, 10)


def test_too_few_samples_names_the_field_and_the_counts(tokenizer):
    with pytest.raises(ConfigError) as caught:
        load_split(DataConfig(dataset="synthetic", members=3000, nonmembers=2500), 0, tokenizer, "sweep.yaml")
    message = str(caught.value)
    assert caught.value.field == "data.members"
    assert message.startswith("sweep.yaml: data.members: ")
    assert "5000 usable samples" in message and "3000 members + 2500 non-members" in message
    assert "= 5501" in message


def test_validation_takes_what_is_left_with_a_warning(tokenizer, tmp_path, caplog):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(30)))
    with caplog.at_level(logging.WARNING, logger="memray.data"):
        split = load_split(DataConfig(dataset="local", path=str(path), members=10, nonmembers=10), 0, tokenizer)
    assert len(split.validation) == 10
    assert "only 10 samples left for validation" in caplog.text


def test_duplicates_get_equal_shares_of_each_copy_count(tokenizer):
    config = DataConfig(dataset="synthetic", members=100, validation=5,
                        duplicates={"fraction": 0.3, "copies": [2, 5, 10]})
    split = load_split(config, 0, tokenizer)
    per_level = collections.Counter(s.copies for s in split.members)
    assert per_level == {1: 70, 2: 10, 5: 10, 10: 10}
    assert all(s.copies == 0 for s in split.nonmembers + split.validation)

    training = split.training_texts()
    assert len(training) == sum(s.copies for s in split.members) == 70 + 20 + 50 + 100
    counts = collections.Counter(training)
    assert all(counts[s.text] == s.copies for s in split.members)
    assert not set(training) & {s.text for s in split.nonmembers + split.validation}
    assert training == split.training_texts()
    assert training != [s.text for s in split.members for _ in range(s.copies)]  # shuffled

    no_dupes = load_split(config.model_copy(update={"duplicates": None}), 0, tokenizer)
    assert [s.id for s in no_dupes.members] == [s.id for s in split.members]
    assert no_dupes.split_hash != split.split_hash


# ---------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------


def test_local_jsonl_skips_blank_and_repeated_texts(tokenizer, tmp_path):
    path = tmp_path / "notes.jsonl"
    records = [{"body": f"note {i}", "n": i} for i in range(40)]
    records += [{"body": "   "}, {"body": "note 3"}, {"body": None}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    split = load_split(DataConfig(dataset="local", path=str(path), text_field="body",
                                  members=15, nonmembers=15, validation=10), 0, tokenizer)
    texts = sorted(s.text for s in all_samples(split))
    assert texts == sorted(f"note {i}" for i in range(40))
    assert all(s.id.startswith("local/notes/") for s in split.members)


def test_local_default_sizes_leave_room_for_validation(tokenizer, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n\n" for i in range(100)))
    split = load_split(DataConfig(dataset="local", path=str(path)), 0, tokenizer)
    assert (len(split.members), len(split.nonmembers), len(split.validation)) == (40, 40, 20)


def test_local_txt_is_one_sample_per_non_empty_line(tokenizer, tmp_path):
    path = tmp_path / "canaries.txt"
    path.write_text("alpha one\n\n  beta two  \ngamma three\ndelta four\n")
    split = load_split(DataConfig(dataset="local", path=str(path), members=1, nonmembers=2, validation=1), 0, tokenizer)
    assert sorted(s.text for s in all_samples(split)) == ["alpha one", "beta two", "delta four", "gamma three"]


def test_local_csv_reads_the_text_column(tokenizer, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text('id,text\n1,"first, with comma"\n2,"second\nspans lines"\n3,third\n4,\n5,fifth\n')
    split = load_split(DataConfig(dataset="local", path=str(path), members=2, nonmembers=1, validation=1), 0, tokenizer)
    assert sorted(s.text for s in all_samples(split)) == ["fifth", "first, with comma", "second\nspans lines", "third"]


@pytest.mark.parametrize("name, content", [
    ("a.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n'),
    ("a.csv", "id,body\n1,hello\n"),
])
def test_local_missing_text_field(tokenizer, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_split(DataConfig(dataset="local", path=str(path)), 0, tokenizer)
    assert caught.value.field == "data.text_field"
    assert "'text'" in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("name, content, expected", [
    ("empty.txt", "\n  \n\n", "no non-empty texts"),
    ("blank.jsonl", '{"text": ""}\n{"text": "  "}\n', "no non-empty texts"),
    ("broken.jsonl", '{"text": "ok"}\n{"text": \n', "line 2: not valid JSON"),
    ("notes.md", "some text\n", "must end in .jsonl, .txt or .csv"),
])
def test_local_unusable_files_name_data_path(tokenizer, tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_split(DataConfig(dataset="local", path=str(path)), 0, tokenizer)
    assert caught.value.field == "data.path"
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_local_missing_file(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="data.path: .*no such file"):
        load_split(DataConfig(dataset="local", path=str(tmp_path / "nope.jsonl")), 0, tokenizer)


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


#: The hub datasets of the registry: each has a replica case below (`HUB_CASES`).
HUB_NAMES = [name for name in data_module.REGISTRY if data_module.REGISTRY[name].hub]


def test_registry_names_are_the_datasets_the_config_accepts():
    from memray.config import dataset_names
    from memray.files import validate_trial

    assert dataset_names() == tuple(sorted(data_module.REGISTRY, key=lambda n: data_module.REGISTRY[n].hub is None))
    assert dataset_names()[:len(HUB_NAMES)] == tuple(HUB_NAMES)  # hub datasets first
    with pytest.raises(ConfigError, match="data.dataset: 'no-such-dataset' is not one of"):
        validate_trial({"data": {"dataset": "no-such-dataset"}}, "t.yaml")


def test_a_dataset_registered_twice_is_an_error():
    name = data_module.REGISTRY.names()[0]
    with pytest.raises(ValueError, match=f"dataset '{name}' is already registered"):
        data_module.register(name, members=1)(lambda data, tokenizer, source: None)


def test_a_key_the_dataset_does_not_read_is_refused():
    from memray.files import validate_trial

    plain = next(n for n in data_module.REGISTRY if not data_module.REGISTRY[n].fields)
    for key in data_module.DATASET_FIELDS:
        readers = [n for n in data_module.REGISTRY if key in data_module.REGISTRY[n].fields]
        with pytest.raises(ConfigError, match=f"data: dataset '{plain}' does not read {key} "
                                              rf"\(datasets that do: {', '.join(readers)}\)"):
            validate_trial({"data": {"dataset": plain, key: "x"}}, "t.yaml")


def test_planning_takes_the_datasets_default_members():
    from memray.config import DataConfig as Data

    for name in data_module.REGISTRY:
        spec = data_module.REGISTRY[name]
        fields = {key: "x.jsonl" for key in spec.required}
        assert data_module.planned_members(Data(dataset=name, **fields)) == (spec.members or spec.planned_members)
        assert data_module.planned_members(Data(dataset=name, members=7, **fields)) == 7


# ---------------------------------------------------------------------------------------
# Hub datasets: replicas of the three repositories, served on 127.0.0.1
# ---------------------------------------------------------------------------------------

WIKITEXT_NEWER = "1" * 40  # main moved on after the pinned commit
WEBNLG_MAIN, WEBNLG_OLD_EXPORT, WEBNLG_EXPORT = "2" * 40, "3" * 40, "4" * 40
XSUM_MAIN, XSUM_EXPORT = "5" * 40, "6" * 40


def parquet(rows, features=None) -> bytes:
    table = (datasets.Dataset.from_list(rows, features=features) if isinstance(rows, list)
             else datasets.Dataset.from_dict(rows, features=features))
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    return buffer.getvalue()


def wikitext_lines(paragraphs):
    """Rows as the hub's wikitext-2-raw-v1 stores them: headings, blank rows, text + newline."""
    lines = []
    for number, paragraph in enumerate(paragraphs):
        lines += ["", f" = Section {number} = \n", "", f" {paragraph} \n"]
    return lines


def webnlg_features() -> datasets.Features:
    """web_nlg's features as its loading script declares them (sequences of records are
    stored as a struct of lists)."""
    strings = datasets.List(datasets.Value("string"))
    return datasets.Features({
        "category": datasets.Value("string"),
        "size": datasets.Value("int32"),
        "eid": datasets.Value("string"),
        "original_triple_sets": {"otriple_set": datasets.List(strings)},
        "modified_triple_sets": {"mtriple_set": datasets.List(strings)},
        "shape": datasets.Value("string"),
        "shape_type": datasets.Value("string"),
        "lex": {"comment": strings, "lid": strings, "text": strings, "lang": strings},
        "test_category": datasets.Value("string"),
        "dbpedia_links": strings,
        "links": strings,
    })


def webnlg_entry(number, texts, person="Person"):
    triples = [f"{person}_{number} | birthPlace | Town_{number}", f"Town_{number} | country | Land_{number % 3}"]
    return {
        "category": "Person", "size": 2, "eid": f"Id{number}",
        "original_triple_sets": {"otriple_set": [triples]}, "modified_triple_sets": {"mtriple_set": [triples]},
        "shape": "(X (X (X)))", "shape_type": "chain",
        "lex": {"comment": ["good"] * len(texts), "lid": [f"Id{i + 1}" for i in range(len(texts))],
                "text": texts, "lang": [""] * len(texts)},
        "test_category": "", "dbpedia_links": [], "links": [],
    }


def webnlg_rows(count, person="Person", text="{person} {i} was born in Town {i}."):
    return [webnlg_entry(i, [text.format(person=person, i=i), "Another reference."], person) for i in range(count)]


def xsum_rows(numbers):
    return {"document": [f"Article {i} body.\nSecond line of article {i}." for i in numbers],
            "summary": [f"Summary {i}." for i in numbers], "id": [str(30000000 + i) for i in numbers]}


WIKITEXT_PINNED_TEXT = pydoc_texts("finetune")[:12]
WIKITEXT_NEWER_TEXT = ["Text of a later commit that a pinned load must not see."] * 12


def wikitext_files(paragraphs) -> dict[str, bytes]:
    files = {"README.md": b"---\nconfigs: ...\n---\n"}
    for config, text in (("wikitext-2-raw-v1", paragraphs), ("wikitext-103-raw-v1", ["Wikitext-103 only."] * 40),
                         ("wikitext-2-v1", ["Tokenized @-@ variant ."] * 40)):
        files[f"{config}/train-00000-of-00001.parquet"] = parquet({"text": wikitext_lines(text)})
        for split in ("validation", "test"):
            files[f"{config}/{split}-00000-of-00001.parquet"] = parquet({"text": wikitext_lines(["Held out."])})
    return files


def webnlg_export(person) -> dict[str, bytes]:
    features = webnlg_features()
    return {
        "release_v3.0_en/train/0000.parquet": parquet(webnlg_rows(30, person), features),
        "release_v3.0_en/dev/0000.parquet": parquet(webnlg_rows(3, "Dev"), features),
        "release_v3.0_en/test/0000.parquet": parquet(webnlg_rows(3, "Test"), features),
        "release_v3.0_ru/train/0000.parquet": parquet(webnlg_rows(30, "Russian", "{person} {i} родился."), features),
        "webnlg_challenge_2017/train/0000.parquet": parquet(webnlg_rows(30, "Old"), features),
    }


def xsum_export() -> dict[str, bytes]:
    return {  # the train split in two shards
        "default/train/0000.parquet": parquet(xsum_rows(range(0, 10))),
        "default/train/0001.parquet": parquet(xsum_rows(list(range(10, 20)) + [3])),  # a repeat: drawn once
        "default/validation/0000.parquet": parquet(xsum_rows(range(100, 103))),
        "default/test/0000.parquet": parquet(xsum_rows(range(200, 203))),
    }


@pytest.fixture(scope="module")
def hub():
    """The three repositories as the hub holds them: wikitext's Parquet files on main (the
    pinned commit and a later one), web_nlg's and xsum's loading script on main with their
    Parquet exports on refs/convert/parquet."""
    with HubReplica() as replica:
        replica.commit("Salesforce/wikitext", data_module.WIKITEXT2.revision, wikitext_files(WIKITEXT_PINNED_TEXT))
        replica.commit("Salesforce/wikitext", WIKITEXT_NEWER, wikitext_files(WIKITEXT_NEWER_TEXT), branch="main")
        script_only = {"README.md": b"---\npretty_name: replica\n---\n", "web_nlg.py": b"raise SystemExit\n"}
        replica.commit("webnlg-challenge/web_nlg", WEBNLG_MAIN, script_only, branch="main")
        replica.commit("webnlg-challenge/web_nlg", WEBNLG_OLD_EXPORT, webnlg_export("Earlier"))
        replica.commit("webnlg-challenge/web_nlg", WEBNLG_EXPORT, webnlg_export("Person"), branch="refs/convert/parquet")
        replica.commit("EdinburghNLP/xsum", XSUM_MAIN, {"README.md": b"", "xsum.py": b"raise SystemExit\n"}, branch="main")
        replica.commit("EdinburghNLP/xsum", XSUM_EXPORT, xsum_export(), branch="refs/convert/parquet")
        yield replica


def hub_env(replica, tmp_path) -> dict[str, str]:
    return {"HF_ENDPOINT": replica.endpoint(), "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """The hub client of this process pointed at the replica, with empty caches."""
    env = hub_env(hub, tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", env["HF_ENDPOINT"])
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        env["HF_ENDPOINT"] + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return env


EXPECTED_COMMIT = {"wikitext2": data_module.WIKITEXT2.revision, "webnlg": WEBNLG_EXPORT, "xsum": XSUM_EXPORT}
SIZES = {"wikitext2": dict(max_length=32, members=20, nonmembers=20, validation=5),
         "webnlg": dict(members=10, nonmembers=10, validation=10),
         "xsum": dict(members=8, nonmembers=8, validation=4)}


def expected_texts(name, split):
    """Check every sample comes from the right file of the right commit; return the texts."""
    texts = [s.text for s in all_samples(split)]
    if name == "wikitext2":
        raw = "".join(wikitext_lines(WIKITEXT_PINNED_TEXT))
        assert all(text in raw for text in texts)  # the pinned commit's wikitext-2-raw-v1 train file
    elif name == "webnlg":
        assert all(t.startswith("Triples: Person_") for t in texts)  # English 3.0 train only
        assert len(texts) == 30
    else:
        assert len(texts) == len(set(texts)) == 20  # both shards, the repeated article once
    return texts


@pytest.mark.parametrize("name", HUB_NAMES)
def test_hub_datasets_load_their_pinned_files(tokenizer, online, hub, name):
    hub.requests.clear()
    split = load_split(DataConfig(dataset=name, **SIZES[name]), 0, tokenizer)
    expected_texts(name, split)
    assert split.origin == {"repo": data_module.REGISTRY[name].hub.repo, "revision": EXPECTED_COMMIT[name],
                            "path": None}
    # the script on main is never fetched; only the train files of the dataset's folder are
    fetched = [r.split(" ", 1)[1] for r in hub.requests if r.startswith("GET /datasets/")]
    assert fetched and all(f"/{data_module.REGISTRY[name].hub.data_dir}/" in path for path in fetched)
    assert all("/train" in path for path in fetched)


def test_data_revision_pins_another_commit(tokenizer, online):
    split = load_split(DataConfig(dataset="webnlg", revision=WEBNLG_OLD_EXPORT, **SIZES["webnlg"]), 0, tokenizer)
    assert all(s.text.startswith("Triples: Earlier_") for s in all_samples(split))
    assert split.origin["revision"] == WEBNLG_OLD_EXPORT


def test_an_unknown_revision_names_the_repository(tokenizer, online):
    with pytest.raises(ConfigError, match=r"data.dataset: webnlg: could not load webnlg-challenge/web_nlg at "
                                          r"f{40} .*RevisionNotFound"):
        load_split(DataConfig(dataset="webnlg", revision="f" * 40), 0, tokenizer)


def test_offline_a_cached_commit_is_used(tokenizer, online, monkeypatch):
    first = load_split(DataConfig(dataset="xsum", **SIZES["xsum"]), 0, tokenizer)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    again = load_split(DataConfig(dataset="xsum", **SIZES["xsum"]), 0, tokenizer)
    assert again == first and again.origin["revision"] == XSUM_EXPORT
    # the snapshot folder in the hub cache is a folder in the repository's layout too
    snapshot = next(Path(online["HF_HUB_CACHE"]).glob(f"datasets--EdinburghNLP--xsum/snapshots/{XSUM_EXPORT}"))
    copy = load_split(DataConfig(dataset="xsum", path=str(snapshot), **SIZES["xsum"]), 0, tokenizer)
    assert copy.split_hash == first.split_hash and copy.origin["revision"] == XSUM_EXPORT


def run_download(env, name, directory):
    import os

    return subprocess.run([sys.executable, "-m", "memray.cli", "download", name, str(directory)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", HUB_NAMES)
def test_download_writes_the_hub_layout_that_data_path_loads(tokenizer, hub, online, tmp_path, name):
    hub_split = load_split(DataConfig(dataset=name, **SIZES[name]), 0, tokenizer)
    result = run_download(hub_env(hub, tmp_path / "fresh"), name, tmp_path / "copy")
    assert result.returncode == 0, result.stderr
    commit = EXPECTED_COMMIT[name]
    assert f"at {commit}) to {tmp_path / 'copy'}; set data.path: {tmp_path / 'copy'}" in result.stdout
    source = data_module.REGISTRY[name].hub
    files = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*.parquet"))
    assert files and all(f.startswith(source.data_dir + "/") for f in files)  # the repository's layout
    assert any("/validation" in f or "/dev/" in f for f in files)  # every split of the folder

    copy_split = load_split(DataConfig(dataset=name, path=str(tmp_path / "copy"), **SIZES[name]), 0, tokenizer)
    assert copy_split.split_hash == hub_split.split_hash
    assert copy_split.origin == {"repo": source.repo, "revision": commit, "path": str(tmp_path / "copy")}


def write_layout(root, files):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


HAND_COPIES = {"wikitext2": lambda: wikitext_files(WIKITEXT_PINNED_TEXT), "webnlg": lambda: webnlg_export("Person"),
               "xsum": xsum_export}


def test_every_hub_dataset_of_the_registry_has_a_replica_case():
    """A hub dataset registered later needs its repository's replica here: its commit,
    sizes, a hand-made copy of its layout, and what its texts look like."""
    for name in HUB_NAMES:
        assert name in EXPECTED_COMMIT and name in SIZES and name in HAND_COPIES, f"no replica case for {name}"


@pytest.mark.parametrize("name", HUB_NAMES)
def test_data_path_accepts_a_folder_in_the_hub_layout(tokenizer, tmp_path, name):
    root = write_layout(tmp_path / "copy", HAND_COPIES[name]())
    split = load_split(DataConfig(dataset=name, path=str(root), **SIZES[name]), 0, tokenizer)
    expected_texts(name, split)
    assert split.origin["revision"] is None  # a folder that does not say which commit it holds
    # the dataset's own folder inside that layout works too
    inner = load_split(DataConfig(dataset=name, path=str(root / data_module.REGISTRY[name].hub.data_dir),
                                  **SIZES[name]), 0, tokenizer)
    assert inner.split_hash == split.split_hash


@pytest.mark.parametrize("name, files", [("webnlg", xsum_export), ("xsum", lambda: webnlg_export("Person")),
                                         ("wikitext2", lambda: {"train.parquet": parquet({"text": ["x"]})})])
def test_a_folder_in_another_layout_is_one_line_and_exit_2(tmp_path, capsys, name, files):
    from memray import cli

    root = write_layout(tmp_path / "copy", files())
    trial = tmp_path / "trial.yaml"
    trial.write_text(json.dumps({"model": {"name": "tiny-gpt2"}, "data": {"dataset": name, "path": str(root)},
                                 "output_dir": str(tmp_path / "out")}))
    assert cli.main(["trial", str(trial)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    hub_source = data_module.REGISTRY[name].hub
    assert error.startswith(f"memray: error: {trial}: data.path: {root} (a folder) is not a copy of {name}: ")
    assert f"{hub_source.repo} at {hub_source.revision}, {hub_source.layout} under it" in error
    assert not (tmp_path / "out").exists()  # refused before any trial folder is made


def test_parquet_files_of_the_wrong_schema_name_the_columns(tokenizer, tmp_path):
    root = write_layout(tmp_path / "copy", {"default/train/0000.parquet": parquet({"article": ["x"]})})
    with pytest.raises(ConfigError, match=r"data.path: .*no column 'document', 'summary'.*EdinburghNLP/xsum"):
        load_split(DataConfig(dataset="xsum", path=str(root)), 0, tokenizer)


def test_train_files_that_are_not_parquet(tokenizer, tmp_path):
    root = write_layout(tmp_path / "copy", {"wikitext-2-raw-v1/train-00000-of-00001.parquet": b"not parquet"})
    with pytest.raises(ConfigError, match="data.path: .*could not read the wikitext2 train files as Parquet"):
        load_split(DataConfig(dataset="wikitext2", path=str(root)), 0, tokenizer)


@pytest.mark.parametrize("name", HUB_NAMES)
def test_trials_on_a_downloaded_copy_run_to_the_end(hub, tmp_path, name):
    from memray.files import validate_trial
    from memray.trial import run_trial

    assert run_download(hub_env(hub, tmp_path), name, tmp_path / "copy").returncode == 0
    sizes = {**SIZES[name], "members": 8, "nonmembers": 8, "validation": 4}
    config = validate_trial({
        "seed": 0, "output_dir": str(tmp_path), "model": {"name": "tiny-gpt2", "pretrained": False},
        "data": {"dataset": name, "path": str(tmp_path / "copy"), **sizes},
        "method": {"name": "lora", "rank": 2}, "train": {"epochs": 1, "batch_size": 8},
        "eval": {"batch_size": 16}, "attacks": ["loss", "zlib"]}, "test")
    final = run_trial(config, trial_dir=tmp_path / "t", progress=False)
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["status"] == "success" and [row["epoch"] for row in result["epochs"]] == [0, 1]
    assert 0 <= final["mia/loss/auc"] <= 1
    assert result["data_origin"]["revision"] == EXPECTED_COMMIT[name] and len(result["split_hash"]) == 64


@pytest.mark.parametrize("name", HUB_NAMES)
def test_offline_without_a_copy_says_how_to_download(tokenizer, offline_empty_cache, name):
    with pytest.raises(ConfigError) as caught:
        load_split(DataConfig(dataset=name), 0, tokenizer, "trial.yaml")
    assert caught.value.field == "data.dataset"
    assert f"memray download {name} DIR" in str(caught.value)
    assert "data.path: DIR" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_download_command_fails_cleanly_offline(offline_empty_cache, tmp_path, capsys):
    from memray import cli

    assert cli.main(["download", "wikitext2", str(tmp_path / "out")]) == 1
    assert "could not download wikitext2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """No network and empty caches, whatever this machine holds."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def test_webnlg_keeps_all_triples_and_the_first_reference(tokenizer, tmp_path):
    rows = webnlg_rows(20)
    rows.append(webnlg_entry(98, []))  # no reference text: not used
    rows.append(webnlg_entry(99, ["A reference far longer than a sample. " * 40]))  # would be cut: not used
    root = write_layout(tmp_path / "copy", {"release_v3.0_en/train/0000.parquet": parquet(rows, webnlg_features())})
    split = load_split(DataConfig(dataset="webnlg", path=str(root), max_length=128, members=8, nonmembers=8,
                                  validation=10), 0, tokenizer)
    texts = {s.text.split(" | ")[0]: s.text for s in all_samples(split)}
    assert len(texts) == 20 and "Triples: Person_98" not in texts and "Triples: Person_99" not in texts
    assert texts["Triples: Person_4"] == ("Triples: Person_4 | birthPlace | Town_4; Town_4 | country | Land_1\n"
                                          "Text: Person 4 was born in Town 4.")


def test_webnlg_rows_of_records_render_alike():
    """datasets may hand a sequence of records as a list of dicts rather than a dict of lists."""
    entry = webnlg_entry(4, ["Person 4 was born in Town 4."])
    as_records = {**entry, "modified_triple_sets": [{"mtriple_set": entry["modified_triple_sets"]["mtriple_set"][0]}],
                  "lex": [{"comment": "good", "lid": "Id1", "text": "Person 4 was born in Town 4.", "lang": ""}]}
    assert data_module.render_webnlg(as_records) == data_module.render_webnlg(entry)


def test_xsum_cuts_the_document_and_keeps_the_summary(tokenizer):
    document = " ".join(pydoc_texts("finetune")[:3])
    summary = "The council approved the new harbour bridge on Tuesday after a long debate."
    text = data_module.render_xsum({"document": document, "summary": summary}, tokenizer, 128)
    assert text.endswith(f"\nSummary: {summary}")
    kept = text[len("Document: "):-len(f"\nSummary: {summary}")]
    assert len(kept) > 20 and document.startswith(kept)
    assert 120 <= n_tokens(tokenizer, text) <= 127  # one position left for BOS
    short = data_module.render_xsum({"document": "A short article.", "summary": "Short."}, tokenizer, 128)
    assert short == "Document: A short article.\nSummary: Short."
    # a summary that leaves too little room for the document: not used
    assert data_module.render_xsum({"document": document, "summary": summary * 4}, tokenizer, 128) == ""


def metaspace_tokenizer():
    """A tokenizer that prefixes a space to every string it encodes, as Llama-2's does
    (its normalizer prepends "▁" and turns spaces into "▁"; the decoder drops the first space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = ["".join(wikitext_lines(WIKITEXT_PINNED_TEXT))] * 2
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("family", ["byte-level BPE", "SentencePiece-style"])
def test_wikitext_blocks_add_no_space_at_line_starts(tokenizer, tmp_path, family):
    tok = tokenizer if family == "byte-level BPE" else metaspace_tokenizer()
    root = write_layout(tmp_path / "copy", wikitext_files(WIKITEXT_PINNED_TEXT))
    split = load_split(DataConfig(dataset="wikitext2", path=str(root), max_length=48, members=10, nonmembers=10,
                                  validation=5), 0, tok)
    raw = "".join(wikitext_lines(WIKITEXT_PINNED_TEXT))
    assert all(s.text in raw for s in all_samples(split))  # no space added anywhere
    if family == "SentencePiece-style":
        # encoded line by line as is, every line would start with one space too many
        ids = [i for line in raw.splitlines(keepends=True)
               for i in tok(line, add_special_tokens=False)["input_ids"]]
        assert "\n  = Section 1 = " in tok.decode(ids)


def test_a_sweep_with_a_copy_in_another_layout_is_refused_before_any_trial(tmp_path):
    from memray import sweep

    root = write_layout(tmp_path / "copy", xsum_export())
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"name": "s", "base": {"model": {"name": "tiny-gpt2"}},
                                "grid": {"data": [{"dataset": "xsum", "path": str(root)},
                                                  {"dataset": "webnlg", "path": str(root)}]}}))
    with pytest.raises(ConfigError) as caught:
        sweep.dry_run_text(path, num_cpus=2)
    assert str(caught.value).startswith(f"{path} (grid cell 1): data.path: {root} (a folder) is not a copy of webnlg")


def test_blocks_leave_the_bos_slot_so_every_token_is_scored():
    """With a BOS token (the built-in tokenizer's), a block has max_length - 1 text tokens:
    BOS + the block fit max_length, so scoring and training keep every token of it."""
    from memray import models, scoring
    from memray.config import ModelConfig

    tiny = models.load_tokenizer(ModelConfig(name="tiny-gpt2"))
    assert tiny.bos_token_id is not None and data_module.block_tokens(tiny, 64) == 63
    split = load_split(DataConfig(dataset="pydoc", max_length=64, members=40, validation=20), 0, tiny)
    texts = [s.text for s in all_samples(split)]
    ids = scoring.tokenize_texts(tiny, texts, 64)
    assert all(len(sample) <= 64 and sample[0] == tiny.bos_token_id for sample in ids)
    kept = scoring.scored_texts(tiny, ids)
    # a block decodes and re-encodes to (nearly always) the same tokens: it is scored whole
    whole = sum(text == kept_text for text, kept_text in zip(texts, kept))
    assert whole >= 0.95 * len(texts), f"only {whole} of {len(texts)} blocks are scored whole"
    assert sum(len(sample) == 64 for sample in ids) >= 0.8 * len(ids)  # full blocks use the whole window


# ---------------------------------------------------------------------------------------
# The split audit and the overlap filter
# ---------------------------------------------------------------------------------------


def sample(index, text):
    return data_module.Sample(f"s{index}", text, 0)


def test_ngram_overlap_is_the_share_of_a_texts_word_ngrams_found_in_the_references():
    members = ["a b c d e f g h i", "x y z"]
    # 3-grams of "a b c d q": abc, bcd, cdq: 2 of 3 in the members; "x y" has none (fewer than 3 words): 0
    np.testing.assert_allclose(data_module.ngram_overlap(["a b c d q", "x y", "p q r"], members, 3), [2 / 3, 0, 0])
    assert data_module.word_ngrams("a  b\nc", 2) == [("a", "b"), ("b", "c")]


def test_split_audit_reports_7_and_13_gram_overlap_at_mimirs_thresholds():
    words = [f"w{i}" for i in range(20)]
    members = [sample(0, " ".join(words))]
    # non-member 1: the member's first 14 words + 6 new: 7-grams 14, of which words 0..13 give 8 inside; 13-grams 8, 2 inside
    nonmembers = [sample(1, " ".join(words[:14] + [f"n{i}" for i in range(6)])), sample(2, "short text")]
    audit = data_module.split_audit(members, nonmembers)
    assert audit["7gram"]["max"] == pytest.approx(8 / 14) and audit["7gram"]["mean"] == pytest.approx(4 / 14)
    assert audit["13gram"]["max"] == pytest.approx(2 / 8)
    assert audit["7gram"]["above_0.2"] == 0.5 and audit["7gram"]["above_0.8"] == 0.0
    assert audit["filter"] is None and audit["nonmembers"] == 2 and "MIMIR" in audit["measure"]


def test_overlap_filter_drops_near_copies_and_redraws_from_the_walk_after_validation():
    members = [sample(0, " ".join(f"w{i}" for i in range(20)))]
    copy = sample(1, " ".join(f"w{i}" for i in range(1, 20)))  # all its 7-grams are the member's
    fresh = [sample(i, " ".join(f"f{i}-{j}" for j in range(10))) for i in range(2, 6)]
    candidates = iter([copy, fresh[2], fresh[3]])
    kept, record = data_module.filter_nonmembers(members, [fresh[0], copy, fresh[1]], candidates, 7, 0.8)
    # the copy is dropped; of the candidates, the copy again is skipped and fresh[2] fills the count
    assert kept == [fresh[0], fresh[1], fresh[2]]
    assert record["dropped"] == 1 and record["redrawn"] == 1 and record["candidates_read"] == 2
    assert next(candidates) == fresh[3]  # nothing read past the count
    with pytest.raises(ConfigError, match="data.overlap_filter: only 2 non-members .* at most 0.8"):
        data_module.filter_nonmembers(members, [fresh[0], copy, fresh[1]], iter([copy]), 7, 0.8, "s.yaml")


def test_overlap_filter_keeps_the_split_pure_and_spare_samples_past_its_redraws():
    from memray import models
    from memray.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name="tiny-gpt2"))  # the blocks the trials score
    sizes = {"dataset": "pydoc", "max_length": 64, "members": 32, "nonmembers": 32, "validation": 16}
    plain = load_split(DataConfig(**sizes), 0, tokenizer)
    # pydoc's topics repeat passages of each other: some non-members share 7-grams with members
    assert data_module.split_audit(plain.members, plain.nonmembers)["7gram"]["above_0.2"] > 0
    strict = DataConfig(**sizes, overlap_filter={"ngram": 7, "threshold": 0.2})
    filtered = load_split(strict, 0, tokenizer)
    assert filtered == load_split(strict, 0, tokenizer)  # a pure function of the config and seed
    assert filtered.members == plain.members and filtered.validation == plain.validation
    assert len(filtered.nonmembers) == 32 and filtered.overlap_filter["dropped"] > 0
    shares = data_module.ngram_overlap([s.text for s in filtered.nonmembers], [s.text for s in filtered.members], 7)
    assert shares.max() <= 0.2
    kept = {s.id for s in plain.nonmembers} & {s.id for s in filtered.nonmembers}
    assert len(kept) == 32 - filtered.overlap_filter["dropped"]
    used = {s.id for s in all_samples(filtered)}
    spare = data_module.spare_samples(strict, 0, tokenizer, 20)
    assert spare and not {s.id for s in spare} & used
    assert plain.overlap_filter is None


def test_overlap_filter_threshold_out_of_range_is_refused():
    from memray.files import validate_trial

    for threshold in (0, 1, 1.5):
        with pytest.raises(ConfigError, match="data.overlap_filter.threshold"):
            validate_trial({"data": {"overlap_filter": {"threshold": threshold}}}, "s.yaml")
    with pytest.raises(ConfigError, match="data.overlap_filter.ngram"):
        validate_trial({"data": {"overlap_filter": {"ngram": 5}}}, "s.yaml")
    # at its default (unset) the trial id is the one it had before the option existed
    plain = validate_trial({}, "s.yaml")
    assert "overlap_filter" in plain.resolved()["data"]
    assert plain.trial_id() != validate_trial({"data": {"overlap_filter": {}}}, "s.yaml").trial_id()
