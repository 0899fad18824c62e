# Benchmarks (included by the Makefile). Results and how to read them: benchmarks/RESULTS.md.
#   make bench         random effects: vectorised vs the per-entity scipy loop, 10k/100k/1M entities
#   make bench-quick   the same on 2,000 entities: a smoke run for CI (no timing claims)
#   make bench-fe      fixed effect: TF multi-worker stage (1 and 2 workers) vs scipy L-BFGS-B, 1M rows
#   make bench-e2e     gdmix run on MovieLens-100K (3 coordinates, 2 iterations), time per stage
#   make bench-e2e-synthetic   the same on a synthetic problem: 10M rows, 1M users, 10k items
#   make bench-accel   the joint Newton step: acceleration newton vs none on MovieLens-100K, gap and AUC per pass
#   make bench-cpu     random effects: CPU time per entity of each solver in one process
#   make bench-re-stage  the whole `gdmix train` process of a per-entity step (30k users, 470k rows): default vs scipy
#   BENCH_COMPARE="before=/path/to/other/src" make bench-e2e   also runs that source tree, interleaved
#   make bench-daily   the nightly retrain: day 2 with day 1 as prior vs cold vs warm-started (MovieLens by time)
BENCH_SIZES ?= 10000 100000 1000000
BENCH_OUT   ?= benchmarks/results
BENCH_FE_ROWS ?= 1000000

BENCH_SYNTHETIC ?= 10000000 1000000 10000
BENCH_COMPARE ?=
BENCH_REPEATS ?= 1
BENCH_E2E_ARGS = --repeats $(BENCH_REPEATS) $(if $(BENCH_COMPARE),--compare $(BENCH_COMPARE))

.PHONY: bench bench-quick bench-fe bench-e2e bench-e2e-synthetic bench-accel bench-cpu bench-daily bench-re-stage

bench: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/random_effect.py --sizes $(BENCH_SIZES) --out $(BENCH_OUT)/random_effect.json --results benchmarks/RESULTS.md

bench-quick: install
	$(PY) benchmarks/random_effect.py --quick

bench-fe: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/fixed_effect.py --rows $(BENCH_FE_ROWS) --out $(BENCH_OUT)/fixed_effect.json --results benchmarks/RESULTS.md

bench-e2e: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/end_to_end.py $(BENCH_E2E_ARGS) --out $(BENCH_OUT)/end_to_end.json --results benchmarks/RESULTS.md

bench-accel: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/acceleration.py --passes 3 --repeats 3 --out $(BENCH_OUT)/acceleration.json --results benchmarks/RESULTS.md

bench-e2e-synthetic: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/end_to_end.py --synthetic $(BENCH_SYNTHETIC) $(BENCH_E2E_ARGS) --progress --out $(BENCH_OUT)/end_to_end_synthetic.json --results benchmarks/RESULTS.md

bench-cpu: install
	$(PY) benchmarks/random_effect_cpu.py --entities 20000 --sample 1000

## The nightly retrain on MovieLens in time order: day 1, then day 2 with day 1's prior, cold, and warm-started.
bench-daily: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/daily.py --out $(BENCH_OUT)/daily.json --results benchmarks/RESULTS.md

## The random-effect stage as a user runs it: whole processes, default solver vs `solver: scipy`, peak RSS.
bench-re-stage: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/random_effect_stage.py --rows 470000 --users 30000 --out $(BENCH_OUT)/random_effect_stage.json --results benchmarks/RESULTS.md
