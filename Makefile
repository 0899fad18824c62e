# gdmix-kfp. Set-up on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GDMIX  := $(VENV)/bin/gdmix
export SPARK_LOCAL_IP ?= 127.0.0.1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo data test test-fast config-reference clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	scripts/ensure-java.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	$(PY) -c "from gdmix import block_hessian as b; from gdmix.random_effect import vectorised as v, laplace as l; print(f'compiled kernels loaded in {v.warm_up() + l.warm_up() + b.warm_up():.1f} s')"
	$(PY) -m gdmix.spark_cds || echo 'no Spark class-data-sharing archive: Spark starts the slow way'
	touch $@

data: data/ml100k/.converted

# reconverted when the converter changes (a new column, e.g. the 1-5 rating)
data/ml100k/.converted: src/gdmix/data/movielens.py | install
	$(GDMIX) movielens --out data/ml100k --cache data/cache
	touch $@

## The whole pipeline on MovieLens-100K, embedded: prints AUC per iteration and coordinate.
demo: install data
	$(GDMIX) run examples/movielens.yaml --restart

## Every test, slow ones included (real Spark, real TF worker processes).
test: install
	$(VENV)/bin/pytest -q -rfE

## Skip the slow end-to-end tests.
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

## The README's config table and docs/gdmix-config.schema.json, from src/gdmix/config_spec.py.
config-reference: install
	$(PY) scripts/config_reference.py

clean:
	rm -rf runs build .pytest_cache
include mk/kfp.mk
include mk/bench.mk
