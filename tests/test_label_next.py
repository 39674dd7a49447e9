"""Which photos to label next (quality/label_next.py, check_data.py --label-next): uncertain first, spread over
the features, written as a CSV and a gallery, copied on request and never moved."""
import csv
import hashlib

import pytest
import torch

import check_data
from loading.synthetic import make_synthetic
from quality.label_next import (LABEL_NEXT_CSV, LABEL_NEXT_PNG, copy_picks, kmeans, margins, rank_to_label,
                                typicality, why)


def test_margin_is_the_gap_between_the_two_most_probable_classes():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.7, 0.2], [1.0, 0.0, 0.0]])
    assert torch.allclose(margins(probs), torch.tensor([0.0, 0.5, 1.0]))


def test_the_ranking_prefers_uncertain_images():
    # three places in the feature space, two photos in each: one uncertain, one sure
    features = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0], [-1.0, 0.0], [-1.0, 0.01]])
    probs = torch.tensor([[0.99, 0.01], [0.52, 0.48], [0.9, 0.1], [0.45, 0.55], [0.7, 0.3], [0.5, 0.5]])
    picks = rank_to_label(features, probs, n=3)
    assert [p.index for p in picks] == [5, 1, 3]  # one from each place, the most uncertain first
    assert picks[0].margin == 0.0 and all(p.group == 2 for p in picks)
    assert {p.index: (p.suggested, p.runner_up) for p in picks}[3] == (1, 0)
    # more picks than places: the most uncertain of the rest fill the list
    assert [p.index for p in rank_to_label(features[[0, 0, 1, 1]], probs[[0, 1, 2, 3]], n=3)] == [1, 3, 2]


def test_the_ranking_spreads_over_the_features_instead_of_taking_near_copies_of_one_hard_image():
    # ten near-copies of one very uncertain image, and four distinct images a little less uncertain
    copies = torch.tensor([1.0, 0.0, 0.0]) + 0.001 * torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    others = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    features = torch.cat([copies, others])
    probs = torch.tensor([[0.5, 0.5]] * 10 + [[0.6, 0.4]] * 4)
    picks = rank_to_label(features, probs, n=5)
    assert sum(p.index < 10 for p in picks) == 1 and sorted(p.index for p in picks)[1:] == [10, 11, 12, 13]
    assert picks[0].index < 10 and picks[0].group == 10  # by uncertainty alone all five would be copies


def test_with_the_labelled_features_the_picks_are_the_typical_photos_of_what_they_do_not_cover():
    # ten photos like the labelled ones (place a), five in place b where the model is fairly sure, four in place c
    a, b, c = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    features = torch.tensor([a] * 10 + [b] * 5 + [c] * 4)
    probs = torch.tensor([[0.99, 0.01]] * 10 + [[0.9, 0.1]] * 5 + [[0.7, 0.3]] * 4)
    labelled = torch.tensor([a] * 3)
    picks = rank_to_label(features, probs, n=2, labelled=labelled)
    assert picks[0].index in range(15, 19) and picks[1].index in range(10, 15)
    assert [(p.group, p.labelled, p.group_margin) for p in picks] == [(4, 0, 0.4), (5, 0, 0.8)]  # least sure first
    assert why(picks[0], ["cat", "dog"]) == ("typical: the most typical of 4 similar photos, among which the model "
                                             "saw no training photos; its mean margin over them 0.40")
    every = rank_to_label(features, probs, n=4, labelled=labelled)
    assert [p.labelled for p in every] == [0, 0, 3, None]  # the covered place, then the most uncertain of the rest
    assert every[2].index < 10 and every[3].index in range(15, 19) and every[3].index != every[0].index
    assert rank_to_label(features, probs, n=2)[0].index in range(15, 19)  # without them: the most uncertain


def test_typicality_is_highest_in_the_dense_middle():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [2.0, 2.0]])
    t = typicality(x)
    assert int(t.argmax()) == 0 and int(t.argmin()) == 4 and typicality(x[:1]).tolist() == [1.0]


def test_kmeans_finds_separate_groups_and_never_more_than_the_distinct_points():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    x = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centres])
    groups = kmeans(x, 3)
    assert all(len(set(groups[i * 30:(i + 1) * 30].tolist())) == 1 for i in range(3))
    assert len(set(groups.tolist())) == 3
    assert len(set(kmeans(torch.ones(6, 2), 4).tolist())) == 1  # six copies of one point: one cluster


def test_copies_get_new_names_and_the_originals_stay(tmp_path):
    src = tmp_path / "photos"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "x.png").write_bytes(b"one")
    (src / "b" / "x.png").write_bytes(b"two")
    picks = rank_to_label(torch.randn(2, 3), torch.tensor([[0.5, 0.5], [0.6, 0.4]]), n=2)
    copied = copy_picks(picks, [str(src / "a" / "x.png"), str(src / "b" / "x.png")], tmp_path / "to_label")
    assert sorted(p.name for p in copied) == ["x-2.png", "x.png"]
    assert sorted(p.read_bytes() for p in copied) == [b"one", b"two"]
    assert (src / "a" / "x.png").read_bytes() == b"one" and (src / "b" / "x.png").read_bytes() == b"two"


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_check_data_label_next_writes_csv_and_gallery_and_copies_without_changing_the_folder(trained, tmp_path,
                                                                                             capsys):
    photos = make_synthetic(tmp_path / "photos", {"cat": 6, "dog": 6}, size=40, seed=9, splits=("train",))
    before = _snapshot(photos)
    out, dest = tmp_path / "curves", tmp_path / "to_label"
    assert check_data.main([str(photos), "--label-next", "5", "--checkpoint", str(trained["checkpoint"]),
                            "--out-dir", str(out), "--move-to", str(dest), "--workers", "0"]) == 0
    assert _snapshot(photos) == before
    with open(out / LABEL_NEXT_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert all((photos / r["path"]).is_file() and r["suggested"] in ("cat", "dog") for r in rows)
    assert len({r["path"] for r in rows}) == 5 and rows[0]["why"].startswith("uncertain: ")
    assert (out / LABEL_NEXT_PNG).stat().st_size > 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(r["path"].split("/")[-1] for r in rows)
    printed = capsys.readouterr().out
    assert "12 photos in" in printed and f"copied 5 photos to {dest}" in printed


def test_label_next_errors(trained, tmp_path, capsys):
    assert check_data.main([str(tmp_path / "none"), "--label-next", "3", "--checkpoint",
                            str(trained["checkpoint"])]) == 2
    assert f"--label-next {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_data.main([str(tmp_path), "--move-to", str(tmp_path / "x")])
    assert "--move-to copies the photos --label-next N picks" in capsys.readouterr().err
    for flag in (["--json"], ["--label-errors"], ["--quarantine", str(tmp_path / "q")]):
        with pytest.raises(SystemExit):
            check_data.main([str(tmp_path), "--label-next", "3", *flag])
        assert f"{flag[0]} is for the data report, which --label-next does not make" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    with pytest.raises(SystemExit):
        check_data.main([str(tmp_path), "--label-next", "3", "--json", "--label-errors"])
    assert "--json and --label-errors are for the data report" in capsys.readouterr().err
