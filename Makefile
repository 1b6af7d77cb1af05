# The two commands of README.md. Each sets up .venv/ when missing (or when pyproject.toml changed)
# and reuses it otherwise.
PY := .venv/bin/python
HARNESS_DATA ?= $(abspath ../shared/data)
export HARNESS_DATA
# One torch thread per process: on a shared 2-core machine two OpenMP threads spin against each
# other (measured 10–50× slower under load), and the committed baseline and the matrix's known
# float32 divergences were measured with one thread (results depend on the reduction order).
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

.PHONY: cpu test matrix nightly clean-venv

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch==2.14.1 / torchvision==0.29.1 (pinned in pyproject.toml) install from the local wheel cache.
	# --no-compile: no bytecode for the 5.5 GB of packages up front (Python compiles what it imports,
	# once); measured 69 s -> 45 s for the venv on 2 cores, with the pip upgrade it no longer needs.
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	touch $@

# Main job: the CPU profile, its run directory under runs/ and the HTML report under reports/.
cpu: .venv/.installed
	$(PY) -m harness run --profile cpu --out runs/cpu-latest --html reports/cpu.html

# Tests: engine tests and every CPU case (2 workers), then the GPU path dry-run on the CPU.
test: .venv/.installed
	scripts/run-tests

# The conformance matrix: matrix.csv + matrix.md under runs/matrix-latest, summary copied to reports/.
matrix: .venv/.installed
	$(PY) -m harness matrix --out runs/matrix-latest; rc=$$?; cp runs/matrix-latest/matrix.md reports/matrix.md; exit $$rc

# The nightly job: the CPU profile, history, baseline comparison, report with trends, asv (docs/nightly.md).
nightly: .venv/.installed
	scripts/nightly cpu

clean-venv:
	rm -rf .venv
