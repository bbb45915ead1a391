#!/usr/bin/env bash
# The tests' Tiny Shakespeare. Prepares data/shakespeare_char from it and prints the
# input's absolute path on stdout (everything else goes to stderr). Where it comes from:
#   $SHAKESPEARE_INPUT, if set;
#   else a copy that CI lays beside the repository, if there is one;
#   else data/shakespeare_char/input.txt, downloaded once and checked against its
#   SHA-256 (set TINYSHAKESPEARE_URL for a mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
input="${SHAKESPEARE_INPUT:-}"
ci_copy=../shared/data/tinyshakespeare/input.txt
if [ -z "$input" ] && [ -f "$ci_copy" ]; then
    input="$ci_copy"
fi
if [ -n "$input" ]; then
    python data/shakespeare_char/prepare.py --input "$input" >&2
else
    python data/shakespeare_char/prepare.py >&2
    input=data/shakespeare_char/input.txt
fi
realpath "$input"
