#!/usr/bin/env bash
# Install the environment (first run only) and run the test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k metrics`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${UPRET_VENV:-$root/.venv}/bin/python" -m pytest tests -q "$@"
