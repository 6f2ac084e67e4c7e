#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
