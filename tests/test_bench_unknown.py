"""benchmarks/bench_unknown.py: recipes of the combined score chosen on some sources of unknown images and measured
on the one left out; the whole command on a toy model and generated unknown images."""
import json

import pytest
import torch

from benchmarks import bench_unknown
from core.common import UserError
from loading.synthetic import write_unknown_set


def test_best_recipe_weighs_the_part_that_separates():
    g = torch.Generator().manual_seed(0)
    known = torch.randn(3, 200, generator=g, dtype=torch.float64)
    unknown = torch.randn(3, 100, generator=g, dtype=torch.float64)
    unknown[1] += 3  # only the second part tells them apart
    assert bench_unknown.best_recipe(known, unknown) == (0, 1, 0)
    assert bench_unknown.recipe_auroc((0, 1, 0), known, unknown) > 0.95 > 0.7 > bench_unknown.recipe_auroc(
        (1, 0, 0), known, unknown)


def test_each_source_is_measured_with_a_recipe_chosen_without_it():
    g = torch.Generator().manual_seed(1)
    known = torch.randn(2, 400, generator=g, dtype=torch.float64)
    first = torch.randn(2, 100, generator=g, dtype=torch.float64)
    second = torch.randn(2, 100, generator=g, dtype=torch.float64)
    first[0] += 3   # the first source shows in part 0 only
    second[1] += 3  # the second in part 1 only
    rows = bench_unknown.leave_one_source_out(known[:, :200], known[:, 200:], {"a": first, "b": second}, (1, 1))
    assert [(r["left_out"], r["chosen"]) for r in rows] == [("a", [0, 1]), ("b", [1, 0])]
    # chosen on the other source, each recipe misses the one left out; the even recipe catches both
    assert all(r["chosen_auroc"] < 0.7 < 0.85 < r["default_auroc"] for r in rows)


def test_a_whole_score_is_chosen_on_the_other_sources():
    # "a" tells source x alone from the known images, "b" the other three: left out, x gets "b", chosen on the
    # others, though "a" (the checkpoint's) would have been right there.
    known = {"a": torch.zeros(8), "b": torch.zeros(8)}
    x, rest = {"a": torch.ones(4), "b": -torch.ones(4)}, {"a": -torch.ones(4), "b": torch.ones(4)}
    rows = bench_unknown.score_loso(known, {"x": x, "y": rest, "z": rest, "w": rest}, "a")
    assert [(r["left_out"], r["chosen"]) for r in rows] == [("x", "b"), ("y", "b"), ("z", "b"), ("w", "b")]
    assert [(r["chosen_auroc"], r["default_auroc"]) for r in rows] == [(0.0, 1.0)] + [(1.0, 0.0)] * 3


def test_part_names_follow_the_state():
    two = {"means": [0, 0], "rotation": False}
    assert bench_unknown.part_names(two) == ["stem statistics", "stage 1 statistics", "energy"]
    assert bench_unknown.part_names({**two, "penultimate": []}) == [
        "stem statistics", "stage 1 statistics", "energy", "penultimate"]
    assert bench_unknown.part_names({**two, "penultimate": [], "upright": True}) == [
        "stem statistics", "stage 1 statistics", "energy", "penultimate", "upright"]
    assert bench_unknown.part_names({**two, "rotation": True})[-1] == "rotation"  # the four turns, older states


def test_sources_from_specs_or_subfolders(tmp_path):
    for name in ("b", "a", ".hidden"):
        (tmp_path / name).mkdir()
    assert bench_unknown.source_folders(tmp_path, []) == {"a": [tmp_path / "a"], "b": [tmp_path / "b"]}
    assert bench_unknown.source_folders(tmp_path, ["both=a,b"]) == {"both": [tmp_path / "a", tmp_path / "b"]}
    with pytest.raises(UserError, match="--sources 'a': write NAME=SUBFOLDER,SUBFOLDER"):
        bench_unknown.source_folders(tmp_path, ["a"])


@pytest.mark.slow
def test_bench_unknown_prints_both_tables(trained, tmp_path, capsys):
    for i, name in enumerate(("noise", "shapes")):
        write_unknown_set(tmp_path / "other" / name, count=12, size=40, seed=i)
    assert bench_unknown.main(["--checkpoint", str(trained["checkpoint"]), "--other", str(tmp_path / "other"),
                               "--workers", "0"]) == 0
    table, result = capsys.readouterr().out.split("\n{", 1)
    result = json.loads("{" + result)
    assert result["images"] == {"noise": 12, "shapes": 12} and result["parts"] == [
        "stem statistics", "stage 1 statistics", "energy", "penultimate", "upright"]  # the default rotation head's
    assert result["default_recipe"] == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert [r["left_out"] for r in result["loso"]] == ["noise", "shapes"]
    assert result["loso_mean"]["default_auroc"] == pytest.approx(
        sum(r["default_auroc"] for r in result["loso"]) / 2)
    assert set(result["by_score"]) >= {"combined", "msp", "energy"}
    assert "| source left out | recipe chosen on the others |" in table and "| mean |" in table
    assert bench_unknown.main(["--checkpoint", str(trained["checkpoint"]), "--other", str(tmp_path / "other"),
                               "--drop", "energy", "penultimate", "--workers", "0"]) == 0
    dropped = json.loads("{" + capsys.readouterr().out.split("\n{", 1)[1])
    assert dropped["parts"] == ["stem statistics", "stage 1 statistics", "upright"]
    assert dropped["default_recipe"] == [1.0, 1.0, 1.0] and all(len(r["chosen"]) == 3 for r in dropped["loso"])
    assert bench_unknown.main(["--checkpoint", str(trained["checkpoint"]), "--other", str(tmp_path / "other"),
                               "--drop", "rotation"]) == 2  # no such part: the four turns are a score of their own
    assert bench_unknown.main(["--checkpoint", str(trained["checkpoint"]), "--other", str(tmp_path / "other"),
                               "--sources", "all=noise,shapes"]) == 2  # one source: nothing to leave out
