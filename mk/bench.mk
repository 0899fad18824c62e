# Benchmarks (included by the Makefile). Results and how to read them: benchmarks/RESULTS.md.
#   make bench         random effects: vectorised vs the per-entity scipy loop, 10k/100k/1M entities
#   make bench-quick   the same on 2,000 entities: a smoke run for CI (no timing claims)
BENCH_SIZES ?= 10000 100000 1000000
BENCH_OUT   ?= benchmarks/results

.PHONY: bench bench-quick

bench: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/random_effect.py --sizes $(BENCH_SIZES) --out $(BENCH_OUT)/random_effect.json

bench-quick: install
	$(PY) benchmarks/random_effect.py --quick
