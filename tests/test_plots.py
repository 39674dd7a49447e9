"""plots.py: PNG files that open, and confusion matrices that grow with the number of classes."""
import torch
from PIL import Image

from conftest import fixed_confusion_matrix
from core import plots
from core.metrics import confusion_matrix

NAMES = ["a", "b", "c", "d"]


def test_plots_are_pngs_that_grow_with_the_number_of_classes(tmp_path):
    small = plots.save_figure(plots.plot_confusion_matrix(fixed_confusion_matrix(), NAMES), tmp_path / "s.png")
    g = torch.Generator().manual_seed(0)
    cm40 = confusion_matrix(torch.randint(0, 40, (800,), generator=g),
                                     torch.randint(0, 40, (800,), generator=g), 40)
    names = [f"animal_{i:02d}" for i in range(40)]
    big = plots.save_figure(plots.plot_confusion_matrix(cm40, names), tmp_path / "big.png")
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    grid = plots.save_figure(plots.plot_gallery(images, ["x"] * 3), tmp_path / "g.png")
    empty = plots.save_figure(plots.plot_gallery(images[:0], []), tmp_path / "e.png")
    sizes = {}
    for p in (small, big, grid, empty):
        with Image.open(p) as im:
            im.verify()
            sizes[p.name] = im.size
    assert sizes["big.png"][0] > sizes["s.png"][0] and sizes["big.png"][1] > sizes["s.png"][1]
    assert sizes["g.png"][0] > sizes["g.png"][1]  # three images side by side
    assert sizes["e.png"][0] > 0 and sizes["e.png"][0] * sizes["e.png"][1] < sizes["g.png"][0] * sizes["g.png"][1]


def test_unknown_scores_adds_a_box_per_folder_with_its_accepted_share():
    known, unknown = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.5, 3.5, 4.0, 100.0])
    fig = plots.plot_unknown_scores(known, unknown, 3.0, "combined", {"sea": unknown[:2], "street": unknown[2:]})
    hist, boxes = fig.get_axes()
    labels = [t.get_text() for t in boxes.get_yticklabels()]
    assert labels == ["street (0% accepted)", "sea (50% accepted)", "known"]  # top to bottom: known first
    # the one far score does not stretch the axis: it ends near the 99th percentile, not at 100
    assert hist.get_xlim()[1] < 100
    assert len(plots.plot_unknown_scores(known, unknown, 3.0, "combined", {"one": unknown}).get_axes()) == 1
