# Builds of run.c. Each target writes a binary of the same name:
#   make run       default fast build (what users should run): -Ofast -march=native,
#                  single-threaded (see the note in bench/bench_runc.py's output)
#   make runfast   -Ofast, portable
#   make runomp    -Ofast -march=native with OpenMP threads (set OMP_NUM_THREADS)
#   make runexact  plain -O3, IEEE-exact float math (reference for comparisons)
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

BUILDS = run runfast runomp runexact
PYTHON ?= python

.PHONY: default all clean test bench $(addprefix print-cmd-,$(BUILDS))

default: run

all: $(BUILDS)

$(BUILDS): %: run.c Makefile
	$(CC) $(WARN) $(FLAGS_$@) -o $@ run.c $(LDLIBS)

$(addprefix print-cmd-,$(BUILDS)): print-cmd-%:
	@echo $(CC) $(WARN) $(FLAGS_$*) run.c $(LDLIBS)

test:
	$(PYTHON) -m pytest -q

# one line per benchmark script
bench:
	$(PYTHON) bench/bench_runc.py

clean:
	rm -f $(BUILDS)
