#!/usr/bin/env bash
# Benchmark one CUDA GPU at the size of the published runs (ViT-B/32 towers, 128 items per GPU, bf16),
# within 8 minutes in all:
#   1. scripts/benchmark.py at ViT-B/32 sizes, per-GPU batch 128, bf16;
#   2. a 200-step training run (4 epochs x 50 steps) of UPRet with ViT-B/32 towers and random weights,
#      per-GPU batch 128, bf16, on demo surrogate features (scripts/make_surrogate_features.py demo).
# Results go to $OUT/bench_gpu/ when OUT is set, else to runs/bench_gpu/: benchmark.json and .log,
# train/{results.json,log.txt,config.yaml}, and summary.json with the training throughput.
# The surrogate corpus and the checkpoints (several GB) stay in a temporary folder.
#
# Usage: bash scripts/bench_gpu.sh [--dry-run] [--compile]
#   --dry-run   a tiny CPU version of both parts (benchmark section a only), which the tests run
#   --compile   train with --compile as well (a second, 50-step run)
# Environment: UPRET_PYTHON (interpreter to use instead of .venv), UPRET_SKIP_SETUP=1 (skip
# scripts/setup_env.sh), BENCH_WORKERS (data-loader and generator processes, default 8).
# Exit status: 0 when every part succeeded, 1 when a part failed or timed out, 2 without a CUDA device.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dry_run=0
with_compile=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --compile) with_compile=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $arg (expected --dry-run or --compile)" >&2; exit 64 ;;
  esac
done

budget_s=480
start_s=$SECONDS
# Return the seconds a stage may take: its own limit, capped by what is left of the 8-minute budget.
stage_limit() {
  local left=$(( budget_s - (SECONDS - start_s) ))
  (( left < 1 )) && left=1  # timeout 0 would mean no limit at all
  (( left < $1 )) && echo "$left" || echo "$1"
}

no_cuda_message="bench_gpu.sh: no CUDA device found (it needs an NVIDIA GPU and a CUDA build of PyTorch); \
run it on a GPU machine, or pass --dry-run for the tiny CPU version"
# Fail before the set-up, which can take minutes, when the machine has no NVIDIA device at all.
if (( ! dry_run )) && ! compgen -G "/dev/nvidia[0-9]*" > /dev/null && ! nvidia-smi -L > /dev/null 2>&1; then
  echo "$no_cuda_message" >&2
  exit 2
fi

if [[ -n "${OUT:-}" ]]; then
  out="$OUT/bench_gpu"
else
  out="$root/runs/bench_gpu"
fi
mkdir -p "$out/train"
work="$(mktemp -d "${TMPDIR:-/tmp}/upret_bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
workers="${BENCH_WORKERS:-8}"

# Interpreter: UPRET_PYTHON, else the project's .venv (set up here), else a system python3 with torch.
python="${UPRET_PYTHON:-}"
if [[ -z "$python" ]]; then
  python="${UPRET_VENV:-$root/.venv}/bin/python"
  if [[ -z "${UPRET_SKIP_SETUP:-}" ]]; then
    # Without network access pip must fail fast, so that the system interpreter can take over.
    if ! PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=15 timeout "$(stage_limit 180)" bash scripts/setup_env.sh; then
      echo "bench_gpu.sh: scripts/setup_env.sh failed; trying the system python3" >&2
      python="python3"
    fi
  fi
fi
# One interpreter start checks the imports and the device: exit 3 means no CUDA device outside --dry-run.
set +e
"$python" - "$dry_run" > "$out/device.txt" 2>&1 <<'EOF'
import sys

try:
    import open_clip  # noqa: F401
    import torch
    import yaml  # noqa: F401
except ImportError as error:
    print(f"import failed: {error}")
    sys.exit(1)
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "|", torch.cuda.get_device_name(0) if cuda else "CPU")
sys.exit(0 if cuda or sys.argv[1] == "1" else 3)
EOF
check_code=$?
set -e
cat "$out/device.txt"
if (( check_code == 3 )); then
  echo "$no_cuda_message" >&2
  exit 2
elif (( check_code != 0 )); then
  echo "bench_gpu.sh: $python cannot import torch, open_clip and yaml; run scripts/setup_env.sh or set UPRET_PYTHON" >&2
  exit 1
fi

if (( dry_run )); then
  # Section a alone: every section measures memory in fresh subprocesses, which takes a minute on two cores.
  device=cpu; precision=fp32; batch=8; epochs=2; sentences=16; frames=(--min_frames 10 --max_frames 30)
  bench_args=(--device cpu --precision fp32 --quick --sections a --steps 1)
  model_args=(--embed_dim 16 --text_width 16 --text_layers 1 --text_heads 2 --video_width 16 --video_layers 1
              --video_heads 2 --dist_heads 2 --feature_len 8)
  workers=0
else
  # 4 epochs x 50 steps of 128 = 200 steps. One video per sentence of 20-100 frames keeps the corpus near 2 GB.
  device=cuda; precision=bf16; batch=128; epochs=4; sentences=6400; frames=(--min_frames 20 --max_frames 100)
  bench_args=(--device cuda --precision bf16 --batch_size 128)
  # ViT-B/32: 512-d text tower and 768-d video tower of 12 layers each, 64 clips per video.
  model_args=(--embed_dim 512 --text_width 512 --text_layers 12 --text_heads 8 --video_width 768 --video_layers 12
              --video_heads 12 --dist_heads 8 --feature_len 64)
fi
status=0

# 1. Kernel and step benchmark.
echo "bench_gpu.sh: scripts/benchmark.py ${bench_args[*]}" >&2
bench_start=$SECONDS
set +e
timeout "$(stage_limit 150)" "$python" scripts/benchmark.py "${bench_args[@]}" --json "$out/benchmark.json" \
  > "$out/benchmark.log" 2>&1
bench_code=$?
set -e
bench_s=$(( SECONDS - bench_start ))
tail -n 25 "$out/benchmark.log"
(( bench_code == 0 )) || { echo "bench_gpu.sh: benchmark.py exited with $bench_code (124 = timed out)" >&2; status=1; }

# 2. Training run on surrogate features.
train_code=1
data="$work/data"
echo "bench_gpu.sh: writing $sentences surrogate sentences" >&2
if timeout "$(stage_limit 90)" "$python" scripts/make_surrogate_features.py demo --out "$data" \
    --train_sentences "$sentences" --dev_sentences 64 --test_sentences 64 --min_videos 1 --max_videos 1 \
    "${frames[@]}" --workers "$(( workers > 0 ? workers : 1 ))" --log_level WARNING > "$out/surrogate.log" 2>&1; then
  train_args=(--config configs/demo.yaml --data_path "$data/annotations"
              --features_path "$data/features/domain_agnostic" --features_path_retrain "$data/features/domain_aware"
              --device "$device" --precision "$precision" --batch_size "$batch" --epochs "$epochs"
              --num_workers "$workers" --batch_size_val 128 --log_every 10 --do_train --do_eval "${model_args[@]}")
  echo "bench_gpu.sh: training $epochs epochs at batch $batch ($precision)" >&2
  set +e
  timeout "$(stage_limit 240)" "$python" CLCL/main_task_retrieval.py "${train_args[@]}" --output_dir "$work/train" \
    > "$out/train/stdout.log" 2>&1
  train_code=$?
  if (( with_compile && train_code == 0 )); then
    timeout "$(stage_limit 240)" "$python" CLCL/main_task_retrieval.py "${train_args[@]}" --epochs 1 --compile \
      --output_dir "$work/train_compile" > "$out/train/stdout_compile.log" 2>&1
    compile_code=$?
    mkdir -p "$out/train_compile"
    cp "$work/train_compile/"{results.json,log.txt} "$out/train_compile/" 2>/dev/null
    (( compile_code == 0 )) || { echo "bench_gpu.sh: the --compile run exited with $compile_code" >&2; status=1; }
  fi
  set -e
  cp "$work/train/"{results.json,log.txt,config.yaml,curves.png} "$out/train/" 2>/dev/null || true
else
  echo "bench_gpu.sh: writing the surrogate corpus failed or timed out; see $out/surrogate.log" >&2
fi
(( train_code == 0 )) || { echo "bench_gpu.sh: training exited with $train_code (124 = timed out); see $out/train/" >&2; status=1; }

mode=$([[ $dry_run == 1 ]] && echo dry-run || echo gpu)
"$python" - "$out" "$mode" "$bench_code" "$bench_s" "$train_code" "$batch" "$(( SECONDS - start_s ))" <<'EOF'
import json
import sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
bench_code, bench_s, train_code, batch, total_s = (int(value) for value in sys.argv[3:])
summary = {"mode": mode, "total_s": total_s, "benchmark": {"exit_code": bench_code, "wall_s": bench_s},
           "train": {"exit_code": train_code}}
results_path = out / "train" / "results.json"
if results_path.is_file():
    results = json.loads(results_path.read_text())
    history = results["history"]
    steps_per_epoch = results["steps"] // len(history)
    # The first epoch includes CUDA start-up and autotuning, so the throughput uses the later ones when present.
    timed = history[1:] or history
    seconds = sum(row["train"]["epoch_time_s"] for row in timed)
    summary["train"].update({
        "steps": results["steps"],
        "global_batch": batch,
        "epoch_time_s": [round(row["train"]["epoch_time_s"], 3) for row in history],
        "samples_per_s": round(steps_per_epoch * len(timed) * batch / seconds, 1),
        "final_loss": history[-1]["train"]["loss"],
        "wall_time_s": round(results["wall_time_s"], 1),
    })
compiled_path = out / "train_compile" / "results.json"
if compiled_path.is_file():
    compiled = json.loads(compiled_path.read_text())
    summary["train_compile"] = {"steps": compiled["steps"],
                                "epoch_time_s": compiled["history"][0]["train"]["epoch_time_s"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "bench_gpu.sh: results in $out (status $status)" >&2
exit "$status"
