"""lr-conformance: executable conformance cases for claims about SGD, weight decay, LR schedules,
batch size and normalization. See README.md and docs/; fronts: `python -m harness` and `pytest`."""
