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
	# Bytecode: pip compiles one file at a time; compileall -j 0 uses every core (14 s on 2 cores).
	# It must be there: where PYTHONDONTWRITEBYTECODE=1 (this machine, and CI's), Python never caches
	# what it compiles, and every process, each xdist worker and `harness` call, compiled torch's
	# sources again: `import torch` 2.8 s -> 1.75 s, `harness run -j 2` of two smoke cases 14.4 s ->
	# 7.4 s. One file of torch is Python 3.12+ syntax and fails to compile, as under pip: ignored.
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
	  >/dev/null 2>&1 || true
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
