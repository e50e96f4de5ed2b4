#!/usr/bin/env bash
# Install the environment (first run only), write the self-contained demo corpus, then train and
# evaluate a tiny UPRet model on it on the CPU and print the T2V/V2T table.
# Extra arguments go to the driver, e.g. `bash scripts/demo.sh --method cico`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
python="${UPRET_VENV:-$root/.venv}/bin/python"
if [[ ! -f data/demo/annotations/test.pkl ]]; then
  "$python" scripts/make_surrogate_features.py demo --out data/demo
fi
exec "$python" CLCL/main_task_retrieval.py --config configs/demo.yaml --do_train --do_eval "$@"
