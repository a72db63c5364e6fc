# Two set-up commands (README): `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= train,export,openvino,dicom,plot,serve,scale,dev
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-all clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch and torchvision come from the registry, resolved together (never the CPU-only 2.13.0 wheel).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/edgeretina demo --workdir demo-run

test: install
	$(PY) -m pytest -q

test-all: install
	EDGERETINA_SLOW=1 $(PY) -m pytest -q

clean:
	rm -rf demo-run .pytest_cache
