#!/usr/bin/env bash
# Set up (pinned CPU torch, the package and its test extras), prepare data, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c .ci/constraints.txt -e ".[dev]"
SHARED_TEXT="${SHAKESPEARE_INPUT:-../shared/data/tinyshakespeare/input.txt}"
python data/shakespeare_char/prepare.py --input "$SHARED_TEXT"
python -m pytest -q "$@"
