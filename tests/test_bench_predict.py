"""benchmarks/bench_predict.py: INT8 against float ONNX and the API's overhead, on a toy model."""
import json
import time

import pytest

from benchmarks import bench_predict
from prediction import Classifier
from prediction.checkpoint import load_checkpoint
from prediction.quantize import int8_images


def test_per_call_ms_times_each_contender_in_alternating_rounds(monkeypatch):
    monkeypatch.setattr(bench_predict, "BURST_SECONDS", 0.02)
    order = []
    contenders = {"quick": lambda: order.append("quick"), "slow": lambda: order.append("slow") or time.sleep(0.002)}
    ms = bench_predict.per_call_ms(contenders, rounds=3)
    assert set(ms) == {"quick", "slow"} and ms["slow"] >= 2 > ms["quick"]
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches == 1 + 2 * 3  # warm-up quick, slow; then 3 rounds of a burst of quick calls, a burst of slow ones


@pytest.mark.slow
def test_bench_predict_prints_accuracies_sizes_and_timings(trained, capsys, monkeypatch):
    monkeypatch.setattr(bench_predict, "BURST_SECONDS", 0.05)
    assert bench_predict.main(["--checkpoint", str(trained["checkpoint"]), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    table, result = out.split("\n{", 1)
    result = json.loads("{" + result)
    ckpt = load_checkpoint(trained["checkpoint"])
    _, val = int8_images(ckpt, calibration=1, workers=0)
    labels = [p.label for p in Classifier(ckpt).predict_decoded(list(val.images))]
    expected = sum(p == ckpt["classes"][k] for p, k in zip(labels, val.labels.tolist())) / len(labels)
    assert result["accuracy"]["torch_accuracy"] == round(expected, 4) == result["accuracy"]["onnx_accuracy"]
    assert result["accuracy"]["val_images"] == len(val.labels) and 0 <= result["accuracy"]["int8_agreement"] <= 1
    assert 0 < result["bytes"]["onnx-int8"] < result["bytes"]["onnx"]
    assert set(result["network_ms"]) == set(result["api_ms"]) == {"1", "32"}
    assert all(v > 0 for t in result["network_ms"].values() for v in t.values())
    assert "| network alone, 32 images |" in table and "| prediction through the API, 1 image |" in table
    assert "| INT8 ONNX |" in table and "Classifier.predict" in table
    assert f"`{result['command']}` at commit {result['commit']}, {result['date']};" in table
