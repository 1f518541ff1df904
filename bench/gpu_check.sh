#!/usr/bin/env bash
# One prepared check for the first GPU, run unattended (under 8 minutes on one H100), answering every
# performance question at once; with no GPU, a smoke mode on tiny shapes (a few minutes) writes the same
# kinds of lines, so CI keeps it working.
#
#   bash bench/gpu_check.sh            # results in $OUT (default ./gpu_check_out): env.json, results.jsonl
#
# Lines of results.jsonl: logp naive / ours padded / ours packed (+ flex_attention on a GPU) with tokens/s,
# peak GiB and the largest difference from an fp32 reference; TRL SFTTrainer defaults, our SFT and our IPS
# training tokens/s and peaks; `pipeline check`'s predicted IPS peak beside the measured one. On a GPU each
# line with a target says whether it is met (logp >= 300k tokens/s; SFT and IPS >= 120k). See bench/gpu_check.py.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$here/.venv/bin/python" ]; then py=$here/.venv/bin/python
else py=$(command -v python3 || command -v python); fi
out=${OUT:-$PWD/gpu_check_out}
mkdir -p "$out"
cd "$here"
exec "$py" bench/gpu_check.py --out "$out" "$@"
