"""check_data.py: the data report on a dirty folder, quarantine, fatal problems, and train.py --check-only."""
import json

import pytest

import check_data
import train
from config import TrainConfig
from conftest import NASTY_DUPLICATE, NASTY_IGNORED, NASTY_LEAK, NASTY_UNREADABLE
from core.common import IMAGE_EXTENSIONS, UserError
from loading.layout import UNPARSABLE, read_layout
from loading.synthetic import make_synthetic
from loading.table import MISSING, UNLABELED
from quality import audit


def test_data_report_counts_problems_and_duplicates(nasty_data):
    r = audit.data_report(read_layout(nasty_data))
    assert r["layout"] == "layout: classes from folders in train/ (train) and val/ (val)"
    assert r["classes"] == ["cat", "dog"]
    assert r["counts"] == {"train": {"cat": 18, "dog": 17}, "val": {"cat": 3, "dog": 4}}
    assert sorted(u["path"] for u in r["unreadable"]) == sorted(NASTY_UNREADABLE)
    reasons = {u["path"]: u["reason"] for u in r["unreadable"]}
    assert "decompression-bomb" in reasons["train/dog/bomb.png"]
    assert "decompression-bomb" in reasons["train/cat/bomb_warning.png"]
    assert "truncated" in reasons["train/cat/truncated.jpg"]
    assert r["duplicates"] == [list(NASTY_DUPLICATE)]
    assert r["leaks"] == [list(NASTY_LEAK)]
    assert r["tiny"] == [{"path": "train/dog/one_pixel.png", "size": [1, 1]}]
    assert r["mismatched"] == [{"path": "train/dog/webp_named.png", "format": "WEBP"}]
    assert {"CMYK", "I;16", "P", "RGBA", "RGB", "L"} <= set(r["modes"])
    assert r["sizes"]["min"] == [1, 1] and r["sizes"]["most_common"][0] == [40, 40, 34]
    assert sorted(r["ignored"]) == sorted(NASTY_IGNORED)
    assert r["hidden_folders"] == ["train/.ipynb_checkpoints"]
    assert len(r["hidden_files"]) == 3
    assert r["imbalance"] == pytest.approx(18 / 17, abs=0.01)
    assert r["fatal"] == [] and any("leakage" in w for w in r["warnings"])
    json.dumps(r)  # --json prints it as is


def test_check_command_prints_report_and_quarantines(nasty_data, tmp_path, capsys):
    jail = tmp_path / "quarantine"
    assert check_data.main([str(nasty_data), "--quarantine", str(jail)]) == 0
    out = capsys.readouterr().out
    for rel in NASTY_UNREADABLE:
        assert rel in out
        assert (jail / rel).is_file() and not (nasty_data / rel).exists()
    assert "train/dog/dog_0001.png = val/dog/leaked_dog_0001.png" in out and "verdict: ok to train" in out
    assert (f"skipped for their extension, not one of {' '.join(sorted(IMAGE_EXTENSIONS))} (rename any that are "
            f"images) ({len(NASTY_IGNORED)}):") in out
    for rel in NASTY_IGNORED:
        assert f"\n  {rel}\n" in out, rel
    # Quarantined files are gone from the data, so the next check is clean and nothing was deleted.
    assert check_data.main([str(nasty_data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unreadable"] == []
    assert len(list(jail.rglob("*.*"))) == len(NASTY_UNREADABLE)


def test_quarantine_refuses_a_folder_inside_the_data(nasty_data, capsys):
    assert check_data.main([str(nasty_data), "--quarantine", str(nasty_data / "train" / "bad")]) == 2
    assert "inside the data's split folders" in capsys.readouterr().err
    assert (nasty_data / NASTY_UNREADABLE[0]).exists()


def check(data, **settings) -> audit.DataCheck:
    """check_data.py's check of `data` without the script: decoded in this process."""
    return audit.check_data(TrainConfig(data=str(data), workers=0, **settings))


@pytest.mark.parametrize("problem,message", [
    ("one_class", "a classifier needs at least 2"),
    ("all_bad_class", "train has no readable image for class(es): horse"),
    ("mostly_bad", "cannot be read"),
    ("val_missing_class", "val has no readable image for class(es): dog"),
])
def test_fatal_problems_exit_nonzero(tmp_path, problem, message):
    data = make_synthetic(tmp_path / "d", 3, size=24, splits=("train",))
    if problem == "one_class":
        for f in (data / "train" / "dog").iterdir():
            f.unlink()
        (data / "train" / "dog").rmdir()
    elif problem == "all_bad_class":
        (data / "train" / "horse").mkdir()
        (data / "train" / "horse" / "h.jpg").write_bytes(b"")
    elif problem == "mostly_bad":
        for i in range(8):
            (data / "train" / "cat" / f"bad{i}.png").write_text("no")
    else:
        make_synthetic(data, {"cat": 8}, size=24, splits=("val",))
    checked = check(data)
    assert checked.code == 1
    assert any(message in f for f in checked.report["fatal"]), checked.report["fatal"]


def test_an_empty_class_folder_is_reported_not_fatal(tmp_path):
    data = make_synthetic(tmp_path / "d", 3, size=24, splits=("train",))
    (data / "train" / "horse").mkdir()
    checked = check(data)
    assert checked.code == 0 and checked.report["fatal"] == []
    assert checked.report["empty_classes"] == ["train/horse"]


def name_labelled(tmp_path, per_class: int):
    """Dogs vs. Cats style: ROOT/train/cat.0.png, dog.1.png, ... with no class folders; ROOT/train returned."""
    flat = make_synthetic(tmp_path / "gen", per_class, size=24, splits=("train",))
    data = tmp_path / "dogs-vs-cats" / "train"
    data.mkdir(parents=True)
    for i, f in enumerate(sorted(flat.rglob("*.png"))):
        f.rename(data / f"{f.parent.name}.{i}.png")
    return data


def test_check_on_a_name_labelled_flat_folder_reports_layout_and_unparsable_names(tmp_path, capsys):
    data = name_labelled(tmp_path, 4)
    (data / "IMG.png").write_bytes((data / "cat.0.png").read_bytes())
    assert check_data.main([str(data.parent), "--labels-from-name", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layout"] == ("layout: labels from file names (the name before its number) in train/ (train); "
                           "val = 20% of train (stratified, seed 0)")
    assert r["classes"] == ["cat", "dog"] and r["problems"] == {UNPARSABLE: ["train/IMG.png"]}
    assert r["counts"] == {"train": {"cat": 3, "dog": 3}, "val": {"cat": 1, "dog": 1}}
    checked = check(data.parent)  # without the flag: no class folders, a fatal finding that names the fix
    assert checked.code == 1 and list(checked.report) == ["data", "fatal"]
    assert "add --labels-from-name" in checked.report["fatal"][0]


def test_a_folder_the_layout_cannot_read_prints_three_lines_even_for_json(tmp_path, capsys):
    data = name_labelled(tmp_path, 2).parent
    fatal = check(data).report["fatal"][0]
    for flags in ([], ["--json"]):
        assert check_data.main([str(data), *flags]) == 1
        assert capsys.readouterr().out == f"data: {data}\nFATAL: {fatal}\nverdict: cannot train on this data\n"


def test_check_on_a_table_names_missing_rows_and_unlabelled_images(tmp_path):
    data = make_synthetic(tmp_path / "d", 3, size=24, splits=("train",))
    files = sorted(p.relative_to(data / "train").as_posix() for p in data.rglob("*.png"))
    rows = [f"{f.rsplit('.', 1)[0]},{f.split('/')[0]}" for f in files[1:]] + ["cat/ghost,cat"]
    (data / "labels.csv").write_text("id,breed\n" + "\n".join(rows) + "\n")
    checked = check(data, labels=str(data / "labels.csv"))
    assert checked.code == 0
    assert checked.report["layout"] == ("layout: labels from labels.csv (columns id -> breed) for the files in "
                                        "train/ (train); val = 20% of train (stratified, seed 0)")
    assert checked.report["problems"] == {MISSING: ["cat/ghost (line 7)"], UNLABELED: [f"train/{files[0]}"]}
    assert checked.text.splitlines()[0] == checked.report["layout"]


def test_check_without_a_data_folder_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="no dataset folder at"):
        check(tmp_path / "nope")
    assert check_data.main([str(tmp_path / "nope")]) == 2
    assert "no dataset folder at" in capsys.readouterr().err


def test_train_check_only_prints_the_report(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", 3, size=24, splits=("train", "test"))
    assert train.main(["--check-only", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("layout: classes from folders in train/ (train) and test/ (test); val = 20% of "
                                   "train (stratified, seed 0)")
    assert "test" in out.splitlines()[2] and "holds out --val-fraction 0.2 of train" in out
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- crashes and Ctrl-C
