# Two commands on a fresh machine: `make app` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

.PHONY: install app test lint checkpoints
install: $(STAMP)

app: $(STAMP)
	$(VENV)/bin/streamlit run app/streamlit_app.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

checkpoints: $(STAMP)
	bash scripts/make_checkpoints.sh
