"""predict.py, the one forward path: normalization, no autograd graph, and every caller's numbers agree."""
import pytest
import torch

from model import SmallResNet, forward_stages
from prediction.predict import ONE_PASS_IMAGES, explain, extract_features, normalize, per_view, predict_logits


def test_predict_logits_default_normalization_is_unchanged():
    model = SmallResNet(2, 1, 8).eval()
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    cpu = torch.device("cpu")
    with torch.no_grad():
        ref = model(x.float() / 127.5 - 1)
    assert torch.allclose(predict_logits(model, x, cpu), ref, atol=1e-6)
    assert torch.allclose(predict_logits(model, x, cpu, normalization={"mean": [0.5], "std": [0.5]}), ref,
                          atol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_logits_builds_no_autograd_graph(tta):
    """A model whose parameters require grad (the EMA model in training) must not make prediction keep any
    batch's activations for a backward pass: nothing is saved for backward, and the logits carry no graph."""
    model = SmallResNet(2, 1, 8)
    assert all(p.requires_grad for p in model.parameters())
    images = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logits = predict_logits(model, images, torch.device("cpu"), batch_size=16, tta=tta)
    assert logits.shape == (40, 2)
    assert logits.grad_fn is None and not logits.requires_grad
    assert sum(saved) == 0  # with a graph, every convolution's input of every batch would be held here


@pytest.mark.parametrize("tta", [False, True])
def test_logits_features_and_gradcam_give_the_same_prediction(tta):
    """predict_logits (validation, inference), extract_features (the novelty fit, --reject) and explain
    (Grad-CAM) are one forward path: the same logits for the same images, TTA or not."""
    torch.manual_seed(0)
    model = SmallResNet(3, 1, 8)
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    norm = {"mean": [0.4], "std": [0.3]}
    logits = predict_logits(model, images, torch.device("cpu"), batch_size=2, tta=tta, normalization=norm)
    features = extract_features(model, images, batch_size=3, tta=tta, normalization=norm)
    assert torch.allclose(features["logits"], logits, atol=1e-5)
    cam = explain(model, normalize(images[:1], norm), "layers.0", tta=tta, temperature=2.0)
    assert torch.allclose(cam.probabilities, torch.softmax(logits[0] / 2.0, 0), atol=1e-5)
    assert cam.class_idx == int(logits[0].argmax())
    assert not torch.equal(logits, predict_logits(model, images, torch.device("cpu"), tta=not tta, normalization=norm))


def test_small_batches_take_both_views_in_one_pass_and_give_the_same_numbers():
    """per_view: up to ONE_PASS_IMAGES images, the image and its mirror go through the network together and are
    split again, in views() order; larger batches take a pass per view. Either way the same numbers."""
    torch.manual_seed(0)
    model = SmallResNet(2, 1, 8).eval()
    calls = []

    def run(v):
        calls.append(len(v))
        return model(v)

    for n, expected_calls in ((3, [6]), (ONE_PASS_IMAGES + 1, [ONE_PASS_IMAGES + 1] * 2)):
        x = torch.randn(n, 1, 16, 16)
        calls.clear()
        with torch.no_grad():
            got = per_view(run, x, tta=True)
            assert calls == expected_calls
            for a, b in zip(got, [model(x), model(x.flip(-1))]):
                assert torch.allclose(a, b, atol=1e-5)
            stages = per_view(lambda v: forward_stages(model, v)[::-1], x, tta=True)  # (penultimate, maps)
            pen, maps = stages[1]
            ref_maps, ref_pen = forward_stages(model, x.flip(-1))
            assert torch.allclose(pen, ref_pen, atol=1e-5) and len(maps) == len(ref_maps)
            assert all(torch.allclose(m, r, atol=1e-5) for m, r in zip(maps, ref_maps))
    assert per_view(run, torch.randn(2, 1, 16, 16), tta=False)[0].shape == (2, 2)
