#!/usr/bin/env bash
# The GPU checks, in one go (about 8 minutes on one H100/H200):
#   1. bench_iteration.py on CUDA: per-task loop vs batched (and bf16 + channels_last), both configs, with
#      the dispatch-shape timings that tell how much of an iteration the host spends issuing operations,
#      and the seconds per iteration of h200_targets.sh's meta-batch-32 candidate, eager and CUDA graphs;
#   2. the Omniglot CPU-budget configs trained on the GPU, at once: CxGrad float32, CxGrad bf16
#      (mixed_precision) and MAML float32, all with log_inner_loop_statistics; then the results table and
#      the MAML-vs-CxGrad gradient-norm plot (issue 13's H200 targets have their own call:
#      benchmarks/h200_targets.sh, which a lease should run first);
#   3. plain `python train_maml_system.py` twice vs `torchrun --nproc_per_node=1` on a short run: with
#      `deterministic` (the default) the two plain runs must write identical summary CSVs (time columns
#      aside) and the same test accuracy; the script prints REPRODUCIBLE or NOT REPRODUCIBLE.
#   4. cuda_graphs: captured against eager meta-iterations (benchmarks/check_cuda_graphs.py), same losses and
#      weights within float32 rounding, and the speed-up; it prints CUDA GRAPHS MATCH or CUDA GRAPHS DIFFER.
# Usage: OMNIGLOT_ZIPS=DIR bash benchmarks/gpu_checks.sh OUT_DIR
# SKIP_BENCH=1 / SKIP_TRAINING=1 leave out part 1 / part 2. A quick dry run of the script on a CPU machine:
#   DEVICE=cpu SKIP_BENCH=1 EXTRA_ARGS="--total_epochs 1 --total_iter_per_epoch 3 --num_evaluation_tasks 16" \
#   OMNIGLOT_ZIPS=../shared/data/omniglot bash benchmarks/gpu_checks.sh /tmp/gpu_dry_run
set -u
final=${1:?usage: OMNIGLOT_ZIPS=DIR bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$final"
python=${PYTHON:-python3}
work=$(mktemp -d)
out="$work/report"  # everything goes here; OUT_DIR gets summary.txt, the plot and report.tar.gz
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FSL_NO_DOWNLOAD=1 DATASET_DIR="$work/datasets"
experiments="$work/experiments"
summary="$out/summary.txt"
config_dir=experiment_config/omniglot_5way_1shot
device=${DEVICE:-cuda}
read -r -a extra <<< "${EXTRA_ARGS:-}"
say() { echo "== $* ($(date +%T))" | tee -a "$summary"; }

say "GPU"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
"$python" -c "import torch; print('torch', torch.__version__)" | tee -a "$summary"

say "preprocess omniglot"
"$python" preprocess/preprocess.py --datasets omniglot --source "${OMNIGLOT_ZIPS:?}" --dest "$DATASET_DIR" \
    > "$out/preprocess.log" 2>&1 || { tail -5 "$out/preprocess.log" | tee -a "$summary"; }

if [ -z "${SKIP_BENCH:-}" ]; then
    say "bench_iteration (CUDA, nothing else running)"
    timeout 330 "$python" benchmarks/bench_iteration.py --configs omniglot mini_imagenet --devices cuda \
        --iterations 10 --warmup 3 2>&1 | tee -a "$summary"
    say "bench_iteration: h200_targets.sh's 5-way candidate (first order, 64 filters, meta-batch 32)"
    timeout 120 "$python" benchmarks/bench_iteration.py --configs omniglot_cpu --devices cuda \
        --variants batched batched_cuda_graphs --set batch_size=32 cnn_num_filters=64 \
        --iterations 10 --warmup 3 2>&1 | tee -a "$summary"
fi

if [ -z "${SKIP_TRAINING:-}" ]; then
say "Omniglot CPU-budget configs on the GPU (three runs at once)"
train() {  # name config [--key value ...]; a run cut by the timeout keeps its epochs and a resumable checkpoint
    local name=$1 config=$2 started=$SECONDS
    shift 2
    timeout 330 "$python" train_maml_system.py --name_of_args_json_file "$config" \
        --experiment_name "$name" --experiments_dir "$experiments" --device "$device" --show_progress false \
        "$@" "${extra[@]}" > "$out/$name.log" 2>&1
    echo "$name: exit $?, wall $((SECONDS - started)) s; $(tail -1 "$out/$name.log")" >> "$summary"
}
train omniglot_CxGrad_fp32 "$config_dir/CxGrad_4conv_cpu.yaml" --log_inner_loop_statistics true &
train omniglot_CxGrad_bf16 "$config_dir/CxGrad_4conv_cpu.yaml" --log_inner_loop_statistics true --mixed_precision true &
train omniglot_maml_fp32 "$config_dir/maml_4conv_cpu.yaml" --log_inner_loop_statistics true &
wait
grep -h "^epoch" "$out"/omniglot_*.log >> "$out/epochs.txt"
"$python" utils/summarize_results.py "$experiments" --out "$out" 2>&1 | tee -a "$summary"
"$python" utils/plot_experiment.py "$experiments/omniglot_CxGrad_fp32" --compare "$experiments/omniglot_maml_fp32" \
    --out "$out/plots" 2>&1 | tee -a "$summary"
fi

say "cuda_graphs: captured vs eager meta-iterations"
timeout 240 "$python" benchmarks/check_cuda_graphs.py --device "$device" 2>&1 | grep -v Warning | tee -a "$summary"

# A second plain run tells whether the GPU repeats a run: with `deterministic` (the default) cuDNN does
# not autotune and PyTorch's deterministic kernels are used, so plain and plain2 must agree exactly.
say "plain run (twice) vs torchrun --nproc_per_node=1"
short=(--name_of_args_json_file "$config_dir/CxGrad_4conv_cpu.yaml" --experiments_dir "$experiments" --device "$device"
       --show_progress false --total_epochs 1 --total_iter_per_epoch 300 --num_evaluation_tasks 200
       --max_models_to_save 1 "${extra[@]}")
timeout 120 "$python" train_maml_system.py "${short[@]}" --experiment_name plain > "$out/plain.log" 2>&1
timeout 120 "$python" train_maml_system.py "${short[@]}" --experiment_name plain2 > "$out/plain2.log" 2>&1
timeout 120 "$python" -m torch.distributed.run --standalone --nproc_per_node=1 train_maml_system.py "${short[@]}" \
    --experiment_name torchrun1 > "$out/torchrun1.log" 2>&1
grep -H -E "^epoch|Ensemble" "$out/plain.log" "$out/plain2.log" "$out/torchrun1.log" | tee -a "$summary"
same_runs() {  # the two experiments' epoch CSVs without the time columns, and their test summaries
    "$python" - "$experiments/$1" "$experiments/$2" <<'PY'
import csv, json, sys
from pathlib import Path
def numbers(folder):
    rows = list(csv.DictReader(open(Path(folder) / "logs/summary_statistics.csv")))
    rows = [{k: v for k, v in row.items() if "time" not in k} for row in rows]
    test = json.loads((Path(folder) / "test_summary.json").read_text())
    return rows, {k: v for k, v in test.items() if "time" not in k and "wall" not in k}
sys.exit(0 if numbers(sys.argv[1]) == numbers(sys.argv[2]) else 1)
PY
}
if [ ! -f "$experiments/plain/test_summary.json" ] || [ ! -f "$experiments/plain2/test_summary.json" ]; then
    say "NOT COMPARED: plain or plain2 did not finish (see their logs)"
elif same_runs plain plain2; then say "REPRODUCIBLE: two plain runs agree exactly"
else say "NOT REPRODUCIBLE: two plain runs differ"; fi

say "collect"
tar -C "$work" --exclude=saved_models --exclude=tensorboard -czf "$out/experiments_logs.tar.gz" experiments
cp "$summary" "$final/summary.txt"
cp "$out/plots/gradient_norms.png" "$final/" 2>/dev/null
tar -C "$work" -czf "$final/report.tar.gz" report
