"""Each source reads a fixture in its dataset's real file format; splits never leak content."""

from __future__ import annotations

import json

import pytest

from iqa_dist.config import DataConfig
from iqa_dist.data.splits import assign_splits
from iqa_dist.errors import UserError
from iqa_dist.sources.readers import read_source

from . import fixtures


def _names_scores(data):
    return sorted((r.name.split("/")[-1], round(r.score, 3)) for r in data.records)


def test_koniq(tmp_path):
    rows = fixtures.koniq(tmp_path, n=12)
    data = read_source(DataConfig(dataset="koniq10k"), tmp_path)
    assert _names_scores(data) == sorted(rows)
    assert data.score_range == (0.0, 100.0) and data.resize == "512x384" and any(r.split for r in data.records)
    assert {r.split for r in data.records} == {"train", "val", "test"}
    mos = read_source(DataConfig(dataset="koniq10k", score_column="MOS"), tmp_path)
    assert mos.score_range == (1.0, 5.0) and all(1 <= r.score <= 5 for r in mos.records)
    splits, _ = assign_splits(data.records, DataConfig(split="official"))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]


def test_koniq_qalign_json_split(tmp_path):
    rows = fixtures.koniq(tmp_path / "koniq", n=12, sets=False)
    train, test = fixtures.qalign_split(tmp_path / "splits", rows[:10], n_train=7)
    data = read_source(DataConfig(dataset="koniq10k"), tmp_path / "koniq")
    splits, notes = assign_splits(data.records, DataConfig(split=f"{train},{test}", val_fraction=0.3, split_seed=1))
    assert len(splits["test"]) == 3 and len(splits["train"]) + len(splits["val"]) == 7 and len(splits["val"]) == 2
    assert any("2 annotated images are in no split" in n for n in notes)
    with pytest.raises(UserError, match="no official split"):
        assign_splits(data.records, DataConfig(split="official"))


def test_spaq_xlsx_and_csv(tmp_path):
    rows = fixtures.spaq(tmp_path / "x", xlsx=True)
    data = read_source(DataConfig(dataset="spaq"), tmp_path / "x")
    assert _names_scores(data) == sorted(rows) and data.resize == "short:512"
    rows = fixtures.spaq(tmp_path / "c", xlsx=False)
    assert _names_scores(read_source(DataConfig(dataset="spaq"), tmp_path / "c")) == sorted(rows)


def test_kadid_splits_by_reference(tmp_path):
    rows = fixtures.kadid(tmp_path, refs=5, per_ref=3)
    data = read_source(DataConfig(dataset="kadid10k"), tmp_path)
    assert _names_scores(data) == sorted(rows) and data.score_range == (1.0, 5.0)
    splits, _ = assign_splits(data.records, DataConfig(split="random", test_fraction=0.2, val_fraction=0.25))
    refs = {s: {data.records[i].group for i in idx} for s, idx in splits.items()}
    assert all(refs[s] for s in refs)
    assert not (refs["train"] & refs["test"] or refs["train"] & refs["val"] or refs["val"] & refs["test"])
    assert sum(len(v) for v in splits.values()) == 15


def test_agiqa_groups_by_prompt(tmp_path):
    rows = fixtures.agiqa(tmp_path, prompts=3)
    data = read_source(DataConfig(dataset="agiqa3k"), tmp_path)
    assert _names_scores(data) == sorted(rows)
    assert len({r.group for r in data.records}) == 3
    assert read_source(DataConfig(dataset="agiqa3k", score_column="mos_align"), tmp_path).records[0].score == 3.0


def test_livec_drops_first_seven(tmp_path):
    rows = fixtures.livec(tmp_path, n=12)
    data = read_source(DataConfig(dataset="livec"), tmp_path)
    assert _names_scores(data) == sorted(rows) and len(data.records) == 5


def test_generic_and_pyiqa_csv(tmp_path):
    rows = fixtures.generic_csv(tmp_path / "a", n=8, split=True)
    data = read_source(DataConfig(dataset="csv"), tmp_path / "a")
    assert sorted((r.name, r.score) for r in data.records) == sorted(rows)
    splits, _ = assign_splits(data.records, DataConfig(split="official"))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    (tmp_path / "a" / "meta.csv").rename(tmp_path / "a" / "other.csv")
    assert len(read_source(DataConfig(dataset="csv", csv_file="other.csv"), tmp_path / "a").records) == 8


def test_random_split_is_seeded_and_disjoint(tmp_path):
    fixtures.generic_csv(tmp_path, n=40)
    data = read_source(DataConfig(dataset="csv"), tmp_path)
    a, _ = assign_splits(data.records, DataConfig(split="random", split_seed=3))
    b, _ = assign_splits(data.records, DataConfig(split="random", split_seed=3))
    c, _ = assign_splits(data.records, DataConfig(split="random", split_seed=4))
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [29, 3, 8]  # 80/20, then 10% of train
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])


def test_split_files_csv_txt_and_errors(tmp_path):
    fixtures.generic_csv(tmp_path / "d", n=8)
    data = read_source(DataConfig(dataset="csv"), tmp_path / "d")
    names = [r.name for r in data.records]
    (tmp_path / "s.csv").write_text("name,split\n" + "".join(f"{n},{'train' if i < 5 else 'test'}\n" for i, n in enumerate(names)))
    splits, _ = assign_splits(data.records, DataConfig(split=str(tmp_path / "s.csv")))
    assert len(splits["test"]) == 3 and len(splits["train"]) + len(splits["val"]) == 5
    (tmp_path / "train.txt").write_text("\n".join(names[:6]))
    (tmp_path / "test.txt").write_text("\n".join(names[5:]))  # names[5] in both
    with pytest.raises(UserError, match="in both train and test"):
        assign_splits(data.records, DataConfig(split=f"{tmp_path / 'train.txt'},{tmp_path / 'test.txt'}"))
    (tmp_path / "d_test.json").write_text(json.dumps(["nope.png"]))
    with pytest.raises(UserError, match="match no annotated image, e.g. nope.png"):
        assign_splits(data.records, DataConfig(split=str(tmp_path / "d_test.json")))
    (tmp_path / "list.json").write_text(json.dumps(names))
    with pytest.raises(UserError, match="must say its split in the file name"):
        assign_splits(data.records, DataConfig(split=str(tmp_path / "list.json")))
    with pytest.raises(UserError, match="no such split file"):
        assign_splits(data.records, DataConfig(split=str(tmp_path / "missing.json")))


@pytest.mark.parametrize("edit, message", [
    (lambda root: (root / "koniq10k_scores_and_distributions.csv").unlink(), "missing (annotation file)"),
    (lambda root: (root / "koniq10k_scores_and_distributions.csv").write_text('"image_name","MOS"\n"a.jpg",3\n'),
     "missing column(s) MOS_zscore; found image_name, MOS"),
])
def test_annotation_file_errors(tmp_path, edit, message):
    fixtures.koniq(tmp_path, n=4, sets=False)
    edit(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_source(DataConfig(dataset="koniq10k"), tmp_path)


def test_row_problems_name_file_and_row(tmp_path):
    fixtures.koniq(tmp_path, n=6, sets=False)
    csv_path = tmp_path / "koniq10k_scores_and_distributions.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",nan"  # row 3: NaN score
    lines[3] = lines[3].rsplit(",", 1)[0] + ",140"  # row 4: out of range
    lines[4] = lines[4].rsplit(",", 1)[0] + ",abc"  # row 5: not a number
    csv_path.write_text("\n".join(lines) + "\n")
    (tmp_path / "1024x768" / lines[5].split(",")[0].strip('"')).unlink()  # row 6: missing file
    data = read_source(DataConfig(dataset="koniq10k"), tmp_path)
    got = {p.where: p.reason for p in data.problems}
    f = "koniq10k_scores_and_distributions.csv"
    assert "not finite" in got[f"{f} row 3"] and "outside the scale [0, 100]" in got[f"{f} row 4"]
    assert "not a number" in got[f"{f} row 5"] and "image file missing" in got[f"{f} row 6"]
    assert len(data.records) == 2


def test_every_dataset_has_a_reader():
    from iqa_dist.config import DATASETS
    from iqa_dist.sources.readers import READERS

    assert tuple(READERS) == DATASETS  # the config's choices are exactly the readers


def test_a_folder_with_no_or_several_csv_files_says_which_to_give(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no CSV file here: give the annotation file with data.csv_file"):
        read_source(DataConfig(dataset="csv", root=str(tmp_path / "empty")), tmp_path / "empty")
    fixtures.generic_csv(tmp_path / "two", n=2)
    (tmp_path / "two" / "other.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"2 CSV files \(meta.csv, other.csv\): say which holds the annotations"):
        read_source(DataConfig(dataset="csv", root=str(tmp_path / "two")), tmp_path / "two")


def test_an_error_line_is_cut_at_a_word_never_mid_word():
    from iqa_dist.errors import first_line

    long = RuntimeError("Error(s) in loading state_dict for SwinTransformer: " + " ".join(f"key{i}.weight" for i in range(80))
                        + "\nsecond line")
    line = first_line(long)
    assert len(line) <= 300 and line.endswith(" ...") and line[:-4].split()[-1].startswith("key")
    assert first_line(ValueError("\n  short one\nmore")) == "short one"
