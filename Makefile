# The two commands a newcomer needs:
#   make serve [IMAGE=path [SIZE=10G]] [PORT=10809]   install what is needed and serve an image
#   make test                              install what is needed and run the whole suite
PY := .venv/bin/python
IMAGE ?=
SIZE ?=
PORT ?= 10809
JOBS ?= 2

.PHONY: setup test lint unit serve bench

setup:
	@bash scripts/setup.sh

lint: setup
	$(PY) -m ruff check nbdqcow tests bench
	$(PY) -m mypy --strict nbdqcow

test: setup
	$(PY) -m ruff check nbdqcow tests bench
	$(PY) -m mypy --strict nbdqcow
	$(PY) -m pytest -q -n $(JOBS) -p no:cacheprovider tests

unit: setup
	$(PY) -m pytest -q -x tests/unit

serve: setup
	@SIZE="$(SIZE)" exec bash scripts/serve.sh "$(IMAGE)" "$(PORT)"

bench: setup
	$(PY) bench/run.py
