#!/usr/bin/env bash
# The XLA tests and the step-cost suites on whatever accelerator TensorFlow
# sees (a GPU if present, else the CPU), for users who have one:
#
#     bash benchmarks/device_check.sh           # full: tests, overhead, xla tables
#     bash benchmarks/device_check.sh --quick   # smoke: a few steps each
#
# Results go to benchmarks/results/ (KERAS_KFAC_RESULTS overrides), with a
# "_<device>" suffix so that they do not overwrite the committed CPU tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

quick=()
if [[ "${1:-}" == "--quick" ]]; then
    quick=(--quick)
fi

device=$(python - <<'PY'
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("gpu" if gpus else "cpu")
for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    print(f"  {gpu.name}: {details.get('device_name', 'unknown')}", file=__import__("sys").stderr)
PY
)
echo "device: $device ($(python -c 'import os; print(os.cpu_count())') CPU cores, load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"

python -m pytest -q tests/test_xla.py tests/test_cost.py
for batch in 128 1000; do
    python benchmarks/run.py overhead --batch "$batch" --tag "_$device" "${quick[@]}"
done
python benchmarks/run.py xla --tag "_$device" "${quick[@]}"
