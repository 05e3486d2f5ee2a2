#!/usr/bin/env bash
# The GPU proof in one call: build, tests, compute-sanitizer, bench, summary (benchmarks/gpu/README.md).
#
#   benchmarks/gpu/run.sh OUTDIR [--dry-run] [--bundle] [--stages setup,build,...] [--deadline SECONDS]
#
# On a GPU machine it runs every stage, each under its own time limit, the whole within 570 s; without a
# GPU, or with --dry-run, it checks every stage's command line and selection and prints the plan, exiting
# non-zero when something is invalid (CI runs it that way).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,8p' "$0"
  exit 2
fi

cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu/plan.py "$@"
