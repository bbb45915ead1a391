#!/usr/bin/env bash
# Set up (pinned CPU torch, the package and its test extras), prepare data, run the tests.
# Works offline in CI and, on a user's machine, downloads Tiny Shakespeare once (launch/test_data.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c .ci/constraints.txt -e ".[dev]"
SHAKESPEARE_INPUT="$(bash launch/test_data.sh)"
export SHAKESPEARE_INPUT
python -m pytest -q "$@"
