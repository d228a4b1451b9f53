"""memray.data: dataset loading, the seeded member / non-member split, duplication."""

import collections
import json
import logging

import datasets
import huggingface_hub.constants
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from memray import data as data_module
from memray.config import ConfigError, DataConfig
from memray.data import load_split, pydoc_texts, synthetic_texts


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
# Hub datasets, from fake local copies in the hub's schema
# ---------------------------------------------------------------------------------------


def wikitext_lines(paragraphs):
    """Lines as the hub's wikitext-2-raw-v1 stores them: headings, blank lines, text + newline."""
    lines = []
    for number, paragraph in enumerate(paragraphs):
        lines += ["", f" = Section {number} = \n", "", f" {paragraph} \n"]
    return lines


def test_wikitext2_is_chunked_into_blocks_of_max_length_tokens(tokenizer, tmp_path):
    paragraphs = pydoc_texts("finetune")[:12]
    train = wikitext_lines(paragraphs)
    held_out = wikitext_lines(["Held out paragraph that must never be drawn."])
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train}),
        "validation": datasets.Dataset.from_dict({"text": held_out}),
        "test": datasets.Dataset.from_dict({"text": held_out}),
    }).save_to_disk(str(tmp_path / "wikitext"))

    config = DataConfig(dataset="wikitext2", path=str(tmp_path / "wikitext"), max_length=32,
                        members=40, nonmembers=40, validation=20)
    split = load_split(config, 0, tokenizer)
    raw = "".join(train)
    lengths = [n_tokens(tokenizer, s.text) for s in all_samples(split)]
    assert all(s.text in raw for s in all_samples(split))  # contiguous pieces of the train text
    assert all(abs(length - 32) <= 2 for length in lengths)
    assert sum(length == 32 for length in lengths) >= 0.8 * len(lengths)
    assert all(s.id.startswith("wikitext2/train/") for s in split.members)
    assert load_split(config, 0, tokenizer) == split


def test_wikitext2_from_a_single_data_file(tokenizer, tmp_path):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"text": wikitext_lines(pydoc_texts("finetune")[:4])}).to_parquet(str(path))
    split = load_split(DataConfig(dataset="wikitext2", path=str(path), max_length=32, members=10, validation=5), 0, tokenizer)
    assert len(split.members) == 10


def webnlg_features(triples_as_records: bool) -> datasets.Features:
    """web_nlg release_v3.0_en's features as the hub card declares them (struct of lists),
    or with the triple sets as a list of records (how datasets>=4 builds `Sequence({...})`)."""
    strings = datasets.List(datasets.Value("string"))
    triple_sets = ([{"triple_set": strings}] if triples_as_records else {"triple_set": datasets.List(strings)})
    return datasets.Features({
        "category": datasets.Value("string"),
        "size": datasets.Value("int32"),
        "eid": datasets.Value("string"),
        "original_triple_sets": _rename(triple_sets, "otriple_set"),
        "modified_triple_sets": _rename(triple_sets, "mtriple_set"),
        "shape": datasets.Value("string"),
        "shape_type": datasets.Value("string"),
        "lex": {"comment": strings, "lid": strings, "text": strings, "lang": strings},
        "test_category": datasets.Value("string"),
        "dbpedia_links": strings,
        "links": strings,
    })


def _rename(triple_sets, name):
    if isinstance(triple_sets, list):
        return datasets.List({name: triple_sets[0]["triple_set"]})
    return {name: triple_sets["triple_set"]}


def webnlg_entry(number, texts, triples_as_records):
    triples = [f"Person_{number} | birthPlace | Town_{number}", f"Town_{number} | country | Land_{number % 3}"]
    if triples_as_records:
        original, modified = [{"otriple_set": triples}], [{"mtriple_set": triples}]
    else:
        original, modified = {"otriple_set": [triples]}, {"mtriple_set": [triples]}
    return {
        "category": "Person", "size": 2, "eid": f"Id{number}",
        "original_triple_sets": original, "modified_triple_sets": modified,
        "shape": "", "shape_type": "chain",
        "lex": {"comment": ["good"] * len(texts), "lid": [f"Id{i + 1}" for i in range(len(texts))],
                "text": texts, "lang": [""] * len(texts)},
        "test_category": "", "dbpedia_links": [], "links": [],
    }


@pytest.mark.parametrize("triples_as_records", [False, True])
def test_webnlg_renders_triples_and_the_first_reference(tokenizer, tmp_path, triples_as_records):
    entries = [webnlg_entry(i, [f"Person {i} was born in Town {i}.", "Another reference."], triples_as_records)
               for i in range(30)]
    entries.append(webnlg_entry(99, [], triples_as_records))  # no reference text: skipped
    train = datasets.Dataset.from_list(entries, features=webnlg_features(triples_as_records))
    datasets.DatasetDict({"train": train, "dev": train.select(range(2))}).save_to_disk(str(tmp_path / "webnlg"))

    split = load_split(DataConfig(dataset="webnlg", path=str(tmp_path / "webnlg"),
                                  members=10, nonmembers=10, validation=10), 0, tokenizer)
    assert len(all_samples(split)) == 30
    by_person = {s.text.split(" | ")[0]: s.text for s in all_samples(split)}
    assert by_person["Triples: Person_4"] == (
        "Triples: Person_4 | birthPlace | Town_4; Town_4 | country | Land_1\n"
        "Text: Person 4 was born in Town 4.")


def test_xsum_renders_document_and_summary(tokenizer, tmp_path):
    numbers = list(range(12)) + [3, 7]  # two articles appear twice: each is drawn once
    rows = {"document": [f"Article {i} body.\nSecond line." for i in numbers] + [""],
            "summary": [f"Summary {i}." for i in numbers] + ["orphan"],
            "id": [str(1000 + i) for i in range(15)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "xsum"))
    split = load_split(DataConfig(dataset="xsum", path=str(tmp_path / "xsum"),
                                  members=5, nonmembers=5, validation=2), 0, tokenizer)
    texts = [s.text for s in all_samples(split)]
    assert len(set(texts)) == len(texts) == 12
    assert "Document: Article 3 body.\nSecond line.\nSummary: Summary 3." in texts


def test_hub_copy_with_the_wrong_schema(tokenizer, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"article": ["x"]})}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="data.path: .*no column 'document', 'summary'.*EdinburghNLP/xsum"):
        load_split(DataConfig(dataset="xsum", path=str(tmp_path / "bad")), 0, tokenizer)


def test_hub_copy_that_is_not_a_dataset(tokenizer, tmp_path):
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="data.path: .*could not load it as a dataset"):
        load_split(DataConfig(dataset="wikitext2", path=str(tmp_path / "junk.parquet")), 0, tokenizer)


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """No network and empty caches, whatever this machine holds."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("name", ["wikitext2", "webnlg", "xsum"])
def test_offline_without_a_copy_says_how_to_download(tokenizer, offline_empty_cache, name):
    with pytest.raises(ConfigError) as caught:
        load_split(DataConfig(dataset=name), 0, tokenizer, "trial.yaml")
    assert caught.value.field == "data.dataset"
    assert f"python -m memray.data download {name} DIR" in str(caught.value)
    assert "data.path: DIR" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_download_command_fails_cleanly_offline(offline_empty_cache, tmp_path, capsys):
    assert data_module.main(["download", "wikitext2", str(tmp_path / "out")]) == 1
    assert "could not download wikitext2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
