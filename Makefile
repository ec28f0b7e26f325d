# Builds of run.c. Each target writes a binary of the same name:
#   make run       default build (what users should run): -Ofast -march=native, one thread
#   make runfast   -Ofast, portable (no -march=native)
#   make runomp    -Ofast -march=native with OpenMP threads (set OMP_NUM_THREADS)
#   make runexact  plain -O3, no fast-math (reference for comparisons)
#   make runq      int8 inference for version-2 (Q8_0) files: runq.c, which includes run.c
#                  (same command line, tokenizer, sampler and checks), -Ofast -march=native
# All four give the same greedy ids on the models in tests/ and bench/ (each output row
# of a matrix product is summed by one thread, so threads never change results).
# Why `run` has no OpenMP: on the 2-core machine this project uses, runomp reached
# ~1.4x on a 15M model when the machine was quiet, but any other load on a core (or a
# busy host) stalls its per-matmul barriers, and it then fell to 0.1-0.5x of the
# single-threaded speed in 2 runs out of 5. On a many-core machine, try runomp.
# The flags of each build live in FLAGS_<name>; `make print-cmd-<name>` prints the
# compile command so scripts (bench/bench_runc.py) can build a copy elsewhere.

# GNU make predefines CC=cc, which would make a plain `?=` a no-op.
ifeq ($(origin CC),default)
CC = gcc
endif
CC ?= gcc

WARN = -Wall -Wextra
LDLIBS = -lm

FLAGS_run      = -Ofast -march=native
FLAGS_runfast  = -Ofast
FLAGS_runomp   = -Ofast -fopenmp -march=native
FLAGS_runexact = -O3
FLAGS_runq     = -Ofast -march=native

BUILDS = run runfast runomp runexact
PYTHON ?= python

.PHONY: default all clean test test-fast crash-test bench bench-upstream gpu-check bench-select bench-attribution validity demo experiment $(addprefix print-cmd-,$(BUILDS)) print-cmd-runq

default: run

all: $(BUILDS) runq

# build under a temporary name, then rename: a binary that another process is
# running (e.g. a concurrent test session) is replaced atomically, never half-written
$(BUILDS): %: run.c Makefile
	$(CC) $(WARN) $(FLAGS_$@) -o $@.tmp.$$$$ run.c $(LDLIBS) && mv -f $@.tmp.$$$$ $@

runq: runq.c run.c Makefile
	$(CC) $(WARN) $(FLAGS_$@) -o $@.tmp.$$$$ runq.c $(LDLIBS) && mv -f $@.tmp.$$$$ $@

$(addprefix print-cmd-,$(BUILDS)): print-cmd-%:
	@echo $(CC) $(WARN) $(FLAGS_$*) run.c $(LDLIBS)

print-cmd-runq:
	@echo $(CC) $(WARN) $(FLAGS_runq) runq.c $(LDLIBS)

# the suite in TEST_JOBS pytest-xdist workers (one thread each; TEST_JOBS=1: one process); every C
# build first: a fixture building runexact mid-suite raced a smoke run that checks the repo is untouched
TEST_JOBS ?= 2
test: run runq runexact
	$(PYTHON) -m pytest -q $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS))

# crash safety, exhaustively: every stage killed at each of its writes in turn, rerun, compared
# with the uninterrupted run (tests/test_crash.py; make test kills each at one write)
crash-test:
	PREBIAS_CRASH_ALL=1 $(PYTHON) -m pytest -q tests/test_crash.py $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS))

# the edit-test loop: every test but the slow end-to-end ones (how long: README.md)
test-fast: run runq runexact
	$(PYTHON) -m pytest -q -m "not slow" $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS))

# The main job, offline on the bundled sample: data -> tokenizer -> batches + metrics ->
# a short training with checkpoints -> model.bin -> a story from run.c -> evaluation
# of every checkpoint, attention/embedding views and saturation curves in out/, and
# out/report.html, the page that shows them.
# Re-running resumes the finished run (no retraining) and reuses pretokenized data.
DEMO_TRAIN = --max_iters=400 --eval_interval=100
demo: run
	$(PYTHON) tinystories.py sample
	$(PYTHON) tinystories.py train_vocab --vocab_size=512
	$(PYTHON) tinystories.py pretokenize --vocab_size=512
	$(PYTHON) train.py $(DEMO_TRAIN) $(if $(wildcard out/ckpt/ckpt_*.pt),--init_from=resume)
	$(PYTHON) tokenizer.py -t data/tok512.model -o tokenizer.bin
	./run model.bin -z tokenizer.bin -t 0.8 -s 42 -n 256 -i "Once upon a time"
	$(PYTHON) eval.py
	$(PYTHON) visualize_attn.py
	$(PYTHON) visualize_embd.py
	$(PYTHON) visualize_sat_output.py
	$(PYTHON) visualize_sat_batch.py
	$(PYTHON) report.py out

# SMOKE=1 runs the bench and validity targets at smoke size: seconds per script, tiny sizes, the
# same code paths, not a measurement (bench/smoke.py; make test runs each script so, in
# tests/test_bench.py). Its runs go to temp folders, never to a cache a full run reuses.
SMOKE_FLAG = $(if $(SMOKE),--smoke)

# one line per benchmark script; UPSTREAM=<a llama2.c checkout> also times its run.c and runq.c
bench: run runq
	$(PYTHON) bench/bench_runc.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_export.py $(SMOKE_FLAG) $(if $(UPSTREAM),--upstream=$(UPSTREAM))
	$(PYTHON) bench/bench_spine.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_metrics.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_pretokenize.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_train.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_eval.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_durability.py $(SMOKE_FLAG)
	$(PYTHON) bench/bench_attribute.py $(SMOKE_FLAG)

# training speed beside llama2.c's train.py (UPSTREAM=<a llama2.c checkout>): the same data, shapes, batch, lr,
# fp32, 3 interleaved rounds at dim 16/64/288 and with --compile=True at 288 (~15 min on 2 quiet cores);
# BENCH_ARGS=--threads=1 on a loaded machine
bench-upstream:
	$(PYTHON) bench/bench_upstream.py --upstream=$(UPSTREAM) $(BENCH_ARGS)

# on a CUDA machine (under 10 min): the 15M shape in bf16 on the sample beside llama2.c's train.py (tok/s, MFU),
# a killed and resumed run against the uninterrupted one, the 1-GPU torchrun path; DRY=1 plans it on CPU
gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(UPSTREAM),--upstream=$(UPSTREAM)) $(if $(DRY),--dry)

# planted truth: every research measure on problems whose answer is known (bias, coverage)
validity:
	$(PYTHON) bench/validity.py $(SMOKE_FLAG)

# does batch selection pay at matched compute? uniform / loss / rho / rho_ref / pruning against
# uniform at each budget, on the noisy and clean sample and the real stories, 3 seeds (~2 h; runs
# kept in /tmp/bench_select and reused, so a second call only adds what is missing)
bench-select:
	$(PYTHON) bench/bench_select.py $(if $(SMOKE),--smoke,--keep_dir=/tmp/bench_select) $(if $(REAL),--real_dir=$(REAL))

# does attribution pass the field's test? LDS of 5 estimators, top-k vs timing-matched random-k, order-aware
# predictions, on the sample and the real stories (~1 h each on 2 cores; cached, a rerun resumes)
bench-attribution:
	nice -n 10 $(PYTHON) bench/bench_attribution.py $(SMOKE_FLAG) $(if $(REAL),--real_dir=$(REAL))

clean:
	rm -f $(BUILDS) runq $(addsuffix .tmp.*,$(BUILDS) runq)

# The worked example (docs/results.md): shuffle vs curriculum vs anti-curriculum over the
# seeds of config/experiments/curriculum.json on the sample (after make demo's data steps),
# then its report page (how long: README.md).
experiment: run
	$(PYTHON) tinystories.py sample
	$(PYTHON) tinystories.py train_vocab --vocab_size=512
	$(PYTHON) tinystories.py pretokenize --vocab_size=512
	$(PYTHON) experiment.py config/experiments/curriculum.json --jobs=2
	$(PYTHON) report.py out/curriculum
