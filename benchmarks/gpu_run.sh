#!/usr/bin/env bash
# One timed command for a borrowed GPU (see benchmarks/gpu_run.py): install, build, GPU tests,
# benchmarks, memcheck, self-checks; a results file and the logs under $OUT. --dry-run: on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_run.py "$@"
