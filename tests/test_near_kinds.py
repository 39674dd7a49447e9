"""benchmarks.near_kinds: folders of unknown images picked from a tagged collection by tag."""
import pytest
from PIL import Image

from benchmarks import near_kinds
from core.common import UserError


def test_a_photo_goes_to_each_folder_of_its_tags_unless_it_carries_an_excluded_one():
    items = [("a.jpg", "people|portrait"), ("b.jpg", "baby"), ("c.jpg", "dog|people"), ("d.jpg", "bird"),
             ("e.jpg", "car|night"), ("f.jpg", "clouds")]
    folders = near_kinds.wanted_folders(["people:portrait,baby", "bird", "car"])
    assert folders == {"people": {"portrait", "baby"}, "bird": {"bird"}, "car": {"car"}}
    picked = near_kinds.near_kind_items(items, folders, {"dog"}, limit=0)
    assert picked == {"people": ["a.jpg", "b.jpg"], "bird": ["d.jpg"], "car": ["e.jpg"]}  # c.jpg has a dog
    sampled = near_kinds.near_kind_items(items, folders, {"dog"}, limit=1, seed=3)
    assert len(sampled["people"]) == 1 and sampled == near_kinds.near_kind_items(items, folders, {"dog"}, 1, 3)


def test_the_command_links_the_photos_and_refuses_a_folder_that_exists(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.new("RGB", (8, 8)).save(data / name)
    (data / "labels.csv").write_text("image,tags\n1.jpg,bird\n2.jpg,bird dog\n3.jpg,car\n")
    args = ["--data", str(data), "--labels", str(data / "labels.csv"), "--tags", "bird", "--exclude", "dog",
            "--out", str(tmp_path / "near")]
    assert near_kinds.main(args) == 0
    assert [p.name for p in (tmp_path / "near" / "bird").iterdir()] == ["1.jpg"]
    assert (tmp_path / "near" / "bird" / "1.jpg").resolve() == (data / "1.jpg").resolve()
    assert f"{tmp_path / 'near' / 'bird'}: 1 photos" in capsys.readouterr().out
    with pytest.raises(UserError, match="exists; name a new folder"):
        near_kinds.main(args)
