#!/usr/bin/env bash
# Issue 13's H200 targets, in one device call of at most 10 minutes:
#   Omniglot 5-way 1-shot >= 99.0% ensemble test accuracy within 10 minutes (preprocessing excluded;
#   training, validation and test included); 20-way 1-shot as high as the time allows.
# The candidates below train at once on the one GPU, each under benchmarks/time_to_accuracy.py (when
# validation first reached each threshold; the ensemble test with the run's total wall time) and a wall
# limit of BUDGET_S seconds (default 540, what a 600-second device call leaves after preprocessing).
# Sharing the GPU and the host's cores can only slow a run, so a candidate that meets the target here
# meets it alone. A run the limit cuts has no test; its epochs are listed from summary_statistics.csv.
# Why these candidates: docs/OMNIGLOT.md, "Candidates for the H200 targets".
# Usage on the device machine, the two official zips carried in a folder git ignores:
#   OMNIGLOT_ZIPS=DIR bash benchmarks/h200_targets.sh OUT_DIR
# A quick dry run on a CPU machine:
#   DEVICE=cpu BUDGET_S=300 EXTRA_ARGS="--total_epochs 1 --total_iter_per_epoch 3 --num_evaluation_tasks 16" \
#   OMNIGLOT_ZIPS=../shared/data/omniglot bash benchmarks/h200_targets.sh /tmp/h200_dry_run
set -u
final=${1:?usage: OMNIGLOT_ZIPS=DIR bash benchmarks/h200_targets.sh OUT_DIR}
mkdir -p "$final"
python=${PYTHON:-python3}
work=$(mktemp -d)
logs="$work/logs"  # the runs' logs and JSON lines; OUT_DIR gets summary.txt and logs.tar.gz (a device call returns 8 files)
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 FSL_NO_DOWNLOAD=1 DATASET_DIR="$work/datasets"
experiments="$work/experiments"
summary="$final/summary.txt"
: > "$summary"
device=${DEVICE:-cuda}
budget_s=${BUDGET_S:-540}
read -r -a extra <<< "${EXTRA_ARGS:-}"
say() { echo "== $* ($(date +%T))" | tee -a "$summary"; }

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  nproc; "$python" -c "import torch; print('torch', torch.__version__)"; } | tee -a "$summary"

say "preprocess omniglot (not timed by the targets)"
"$python" preprocess/preprocess.py --datasets omniglot --source "${OMNIGLOT_ZIPS:?}" --dest "$DATASET_DIR" \
    > "$logs/preprocess.log" 2>&1 || { tail -5 "$logs/preprocess.log" | tee -a "$summary"; exit 1; }

five_way=experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml
# the CPU config scaled up (64 filters, meta-batch 32, 12 epochs, inner lr 0.1), shipped for one GPU:
five_way_gpu=experiment_config/omniglot_5way_1shot/CxGrad_4conv_gpu.yaml
twenty_way=experiment_config/omniglot_20way_1shot/CxGrad_4conv_cpu.yaml
candidate() {  # name config [--key value ...]
    local name=$1 config=$2
    shift 2
    OMP_NUM_THREADS=2 timeout "$budget_s" "$python" benchmarks/time_to_accuracy.py "$config" \
        --thresholds 0.9 0.95 0.97 0.98 0.99 --out "$logs/$name.jsonl" --experiment_name "$name" \
        --experiments_dir "$experiments" --device "$device" --show_progress false "$@" "${extra[@]}" \
        > /dev/null 2> "$logs/$name.log"
    echo "$name: exit $?" >> "$work/exits.txt"
}
say "candidates, at once, ${budget_s} s each at most"
# The GPU's load while they run: near 100% would mean the runs slowed each other on the GPU, not the host.
(while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done) \
    > "$logs/gpu_load.txt" 2>&1 &
monitor=$!
# 5-way 1-shot. The CPU config widened to MAML++'s 64 filters at inner lr 0.1 over 9 epochs of 400
# meta-iterations is the settings sweep's best on the CPU (98.81%); over 12 epochs it levels off at 98.4%
# validation (test 98.17%), so more of the same iterations will not reach 99%. What a GPU should give
# nearly for free is tasks: the batched path computes all of a meta-batch's tasks in the same operations,
# and at a meta-batch of 32 the CPU run validated at 99.0% after 9 epochs and tested 99.14% after 12
# (about 92 minutes of epochs on a 2-core CPU): shipped as CxGrad_4conv_gpu.yaml. The host's time per
# iteration is what bounds the GPU, so the same run again with each training iteration replayed from a
# CUDA graph.
candidate h200_5way_64f_9ep "$five_way" --init_inner_loop_learning_rate 0.1 --cnn_num_filters 64 --total_epochs 9 &
candidate h200_5way_64f_12ep_mb32 "$five_way_gpu" &
candidate h200_5way_64f_12ep_mb32_graphs "$five_way_gpu" --cuda_graphs true &
# 20-way 1-shot: the shipped CPU config (87.73% over 3 seeds on the CPU, 2,000 iterations) widened to 64
# filters, with 4 times its meta-batch (16 tasks) and twice its epochs; on the CPU it validated at 92.65%
# after 3 epochs (inner lr 0.05 instead: 92.5%) and at 95.2% after 10, and tested 94.35%.
candidate h200_20way_64f_10ep_mb16 "$twenty_way" --cnn_num_filters 64 --total_epochs 10 --batch_size 16 &
wait $(jobs -p | grep -v "^$monitor$")
kill "$monitor" 2>/dev/null
sort "$work/exits.txt" | tee -a "$summary"
echo "GPU load every 30 s: $(tr '\n' ';' < "$logs/gpu_load.txt")" | tee -a "$summary"

say "results (wall_s: training + validation so far; total_wall_s adds the test and the setup)"
"$python" - "$logs" "$experiments" <<'PY' | tee -a "$summary"
import json, sys
from pathlib import Path
from utils.summarize_results import read_epoch_rows  # run from the repository's root
logs, experiments = Path(sys.argv[1]), Path(sys.argv[2])
for jsonl in sorted(logs.glob("*.jsonl")):
    name = jsonl.stem
    lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    for line in lines:
        if line["event"] == "threshold":
            print(f"{name}: val >= {line['threshold']:.2f}: " + (
                f"epoch {line['epoch']}, {line['iterations']} iterations, {line['wall_s']:.0f} s"
                if line["reached"] else "not reached"))
        if line["event"] == "test":
            print(f"{name}: TEST {100 * line['ensemble_test_accuracy']:.2f}% +- "
                  f"{100 * line['ensemble_test_confidence_95']:.2f}% ({line['models']} models), best val "
                  f"{100 * line['best_val_accuracy']:.1f}%, {line['iterations']} iterations, "
                  f"train+val {line['train_val_wall_s']:.0f} s, total {line['total_wall_s']:.0f} s")
for folder in sorted(experiments.iterdir()) if experiments.exists() else []:
    rows = read_epoch_rows(folder)
    if (logs / f"{folder.name}.jsonl").exists() or not rows:
        continue  # finished runs are above; a run that wrote no epoch has only its log
    wall, epochs = 0.0, []
    for row in rows:
        wall += row["epoch_time_s"]
        epochs.append(f"{100 * row['val_accuracy_mean']:.1f}% @ {wall:.0f} s")
    print(f"{folder.name}: CUT by the limit, no test; val per epoch: " + ", ".join(epochs))
PY
grep -L "Ensemble" "$logs"/h200_*.log 2>/dev/null | while read -r log; do
    echo "--- last lines of $log" | tee -a "$summary"; tail -3 "$log" | tee -a "$summary"; done
for folder in "$experiments"/*/; do cp "$folder/logs/summary_statistics.csv" "$logs/$(basename "$folder").csv" 2>/dev/null; done
tar -C "$work" -czf "$final/logs.tar.gz" logs
say "done"
