"""runs.py: unique run names, the previous run moved aside (never deleted or overwritten), results.csv."""
import shutil

import pytest

from prediction.checkpoint import load_checkpoint, run_name_of, save_checkpoint
from training.runs import append_result, archive_previous_run, read_results, rewrite_results, unique_run_name


def test_a_name_in_use_gets_a_suffix(tmp_path):
    (tmp_path / "logs" / "run").mkdir(parents=True)
    (tmp_path / "models" / "run-2").mkdir(parents=True)
    parents = [tmp_path / "logs", tmp_path / "models", tmp_path / "curves"]
    assert unique_run_name("new", parents) == "new"
    assert unique_run_name("run", parents) == "run-3"


def _previous_run(trained, root, name: str) -> bytes:
    """models/best_model.pth and last.pth of a run called `name`, and its curves; returns best's bytes."""
    ckpt = load_checkpoint(trained["checkpoint"])
    ckpt["config"]["run_name"] = name
    for file in ("best_model.pth", "last.pth"):
        save_checkpoint(ckpt, root / "models" / file)
    (root / "curves").mkdir(parents=True, exist_ok=True)
    for file in ("training_curves.png", "train_batch.png", "metrics.json"):
        (root / "curves" / file).write_text(file)
    (root / "curves" / "other_run").mkdir()  # an earlier run's folder: stays where it is
    return (root / "models" / "best_model.pth").read_bytes()


def test_the_previous_run_moves_to_its_named_folders(trained, tmp_path):
    best = _previous_run(trained, tmp_path, "first")
    moved = archive_previous_run(tmp_path / "models", tmp_path / "curves")
    assert moved == {"first": [tmp_path / "models" / "first", tmp_path / "curves" / "first"]}
    assert (tmp_path / "models" / "first" / "best_model.pth").read_bytes() == best
    assert run_name_of(load_checkpoint(tmp_path / "models" / "first" / "last.pth")) == "first"
    assert sorted(p.name for p in (tmp_path / "curves" / "first").iterdir()) == \
        ["metrics.json", "train_batch.png", "training_curves.png"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["first"]
    assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == ["first", "other_run"]
    assert archive_previous_run(tmp_path / "models", tmp_path / "curves") == {}  # nothing left to move


def test_a_taken_archive_name_gets_a_suffix_and_nothing_is_overwritten(trained, tmp_path):
    _previous_run(trained, tmp_path, "same")
    archive_previous_run(tmp_path / "models", tmp_path / "curves")
    shutil.rmtree(tmp_path / "curves" / "other_run")
    second = _previous_run(trained, tmp_path, "same")  # a later run given the same --run-name by hand
    moved = archive_previous_run(tmp_path / "models", tmp_path / "curves")
    assert list(moved) == ["same-2"]
    assert (tmp_path / "models" / "same-2" / "best_model.pth").read_bytes() == second
    assert (tmp_path / "models" / "same" / "best_model.pth").is_file()


def test_files_of_a_run_without_a_name_are_kept_under_their_date(tmp_path):
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "training_curves.png").write_text("x")
    (moved,) = archive_previous_run(tmp_path / "models", tmp_path / "curves")
    assert moved.startswith("unnamed-") and (tmp_path / "curves" / moved / "training_curves.png").is_file()


def _h(epoch: int, top5: bool = False) -> dict:
    h = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5, "val_loss": 0.25 * epoch, "val_acc": 0.75,
         "lr": 1e-3 / epoch, "epoch_seconds": 1.5, "train_images_per_s": 100.0, "skipped_steps": 0}
    return {**h, "val_top5": 0.9} if top5 else h


def test_results_rows_are_appended_and_a_resume_rewrites_them_to_its_epochs(tmp_path):
    path = tmp_path / "run" / "results.csv"
    for epoch in (1, 2, 3):
        append_result(path, _h(epoch, top5=True))
    rows = read_results(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[2] == pytest.approx({k: v for k, v in _h(3, top5=True).items() if k != "skipped_steps"})
    assert path.read_text().splitlines()[0] == ("epoch,train_loss,train_acc,val_loss,val_acc,val_top5,lr,"
                                                "epoch_seconds,train_images_per_s")
    rewrite_results(path, [_h(1), _h(2)])  # last.pth held epoch 2: the row of epoch 3 is redone
    append_result(path, _h(3))
    assert [r["epoch"] for r in read_results(path)] == [1, 2, 3]
    assert "val_top5" not in read_results(path)[0]
