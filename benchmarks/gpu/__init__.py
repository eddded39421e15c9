"""The whole GPU check of qdora, phase by phase: `python -m benchmarks.gpu --phase PHASE --out DIR`.

GPU time comes in short slices on a machine without network, reached by commands of at most 10 minutes;
each phase fits well inside one command and writes everything into DIR (PHASE.log, PHASE.json and the
RESULTS-ready RESULTS.md). `--dry-run` runs every phase at tiny shapes on the CPU: it is in the test
suite, so the check cannot rot while no GPU is lent. See benchmarks/README.md for the order and timings.
"""
