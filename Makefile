# Two commands on a fresh machine:  `make demo`  (train + inference on synthetic data)  and  `make test`
# (`make test-fast` leaves out the slow tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo_data
UNKNOWN := demo_unknown
DATA   ?=

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# A smoke test of the whole pipeline on a small synthetic set (not real photos): train, inference, evaluate
# (with generated unknown images, and Grad-CAM). Its outputs go to models/demo, curves/demo and logs/demo, apart
# from real runs (evaluate.py's to curves/demo/<run name>/); a second demo moves the first to
# models/demo/<its run name>/ and curves/demo/<its run name>/, as train.py does with every run.
# tests/test_readme.py runs these lines (with fewer epochs) and checks every file README.md names is written.
demo: setup
	$(PY) dataset.py demo $(DEMO)
	$(PY) dataset.py unknown $(UNKNOWN) --count 60
	$(PY) train.py --data $(DEMO) --epochs 8 --batch-size 32 --workers 0 \
		--out-dir models/demo --curves-dir curves/demo --log-dir logs/demo
	$(PY) inference.py --checkpoint models/demo/best_model.pth --image $(DEMO)/test/dog/dog_0000.png
	$(PY) inference.py --checkpoint models/demo/best_model.pth --image $(DEMO)/test --csv curves/demo/predictions.csv
	$(PY) evaluate.py --checkpoint models/demo/best_model.pth --data $(DEMO) --split test --unknown-dir $(UNKNOWN)
	$(PY) evaluate.py --checkpoint models/demo/best_model.pth --gradcam $(DEMO)/test/dog/dog_0000.png

test: setup
	$(PY) -m pytest -q --durations=10

# The quick subset while editing: everything but the tests marked slow (pytest.ini), about a minute on 2 CPU cores.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=10

# Ours against the plain pipeline (benchmarks/baseline.py) on real photos: `make bench DATA=path/to/dataset`.
bench: setup
	@test -n "$(DATA)" || { echo "make bench needs DATA=PATH/TO/DATA (a dataset train.py reads)"; exit 2; }
	$(PY) -m benchmarks.bench --data $(DATA)

clean:
	rm -rf $(DEMO) $(UNKNOWN) models/demo curves/demo logs/demo
