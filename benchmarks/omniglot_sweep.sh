#!/usr/bin/env bash
# The Omniglot 5-way 1-shot CxGrad settings sweep of docs/OMNIGLOT.md: each candidate is the CPU-budget
# config (experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml, at the baseline below) with a few
# keys changed, trained for its first EPOCHS epochs of a 9-epoch schedule (--total_epochs 9
# --total_epochs_before_pause EPOCHS, so the learning rate follows the 9-epoch run's cosine; EPOCHS=9
# resumes a candidate to the end, which ends with its ensemble test). Two candidates run at once, one
# thread each, as on a 2-core machine; the table printed at the end gives each candidate's validation
# accuracy, seconds per epoch and, once it has trained all 9 epochs, its ensemble test accuracy.
#
# Usage: bash benchmarks/omniglot_sweep.sh [CANDIDATE ...]   (default: all; EPOCHS=3, OUT=experiments/sweep)
#        EPOCHS=9 bash benchmarks/omniglot_sweep.sh CANDIDATE ...   (to the end of the schedule, and the test)
# Needs the Omniglot build: python preprocess/preprocess.py --datasets omniglot --source DIR
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
epochs=${EPOCHS:-3}
out=${OUT:-experiments/sweep}
config=experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml
# The config as it was swept: the sweep chose the config's inner learning rate (0.05 since), so the
# baseline keeps the 0.1 it had, and every row of docs/OMNIGLOT.md's table reproduces as it was measured.
baseline=(--init_inner_loop_learning_rate 0.1)

declare -A CANDIDATES=(
    [cx_baseline]=""
    [cx_lslr_bnwb]="--learnable_per_layer_per_step_inner_loop_learning_rate true --per_step_bn_statistics true"
    [cx_msl_lslr_bnwb]="--use_multi_step_loss_optimization true --multi_step_loss_num_epochs 3
                        --learnable_per_layer_per_step_inner_loop_learning_rate true --per_step_bn_statistics true"
    [cx_inner_lr_0.05]="--init_inner_loop_learning_rate 0.05"
    [cx_64_filters]="--cnn_num_filters 64"
    [cx_second_order]="--second_order true"
    [cx_1_query]="--num_target_samples 1"
    [cx_meta_batch_4]="--batch_size 4"
    [cx_meta_lr_0.001]="--meta_learning_rate 0.001"
    [cx_context_lr_0.1]="--context_params_learning_rate 0.1"
    [maml_twin]="--contextual_grad false"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cx_baseline maml_twin cx_lslr_bnwb cx_msl_lslr_bnwb cx_inner_lr_0.05 cx_64_filters cx_second_order
                                cx_1_query cx_meta_batch_4 cx_meta_lr_0.001 cx_context_lr_0.1)
for name in "${names[@]}"; do
    [ -n "${CANDIDATES[$name]+set}" ] || { echo "unknown candidate '$name'; known: ${!CANDIDATES[*]}" >&2; exit 2; }
done

run() {  # name
    # shellcheck disable=SC2086  # the candidate's options are words
    OMP_NUM_THREADS=1 "$python" train_maml_system.py --name_of_args_json_file "$config" --experiments_dir "$out" \
        --experiment_name "$1" --total_epochs 9 --total_epochs_before_pause "$epochs" --show_progress false \
        "${baseline[@]}" ${CANDIDATES[$1]} > "$out/$1.log" 2>&1 || echo "$1: exit $? (see $out/$1.log)"
}
mkdir -p "$out"
for ((i = 0; i < ${#names[@]}; i += 2)); do
    run "${names[i]}" &
    [ $((i + 1)) -lt ${#names[@]} ] && run "${names[i + 1]}" &
    wait
done

"$python" - "$out" "$epochs" "${names[@]}" <<'PY'
import sys
from pathlib import Path
from utils.experiment_paths import ExperimentPaths
from utils.summarize_results import read_epoch_rows, read_summary
out, epochs, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
print("| candidate | " + " | ".join(f"val acc after epoch {e}" for e in range(epochs))
      + " | s per epoch | ensemble test |")
print("|---|" + "---|" * (epochs + 2))
for name in names:
    rows = read_epoch_rows(out / name)[:epochs]
    accuracies = [f"{100 * r['val_accuracy_mean']:.2f}%" for r in rows] + ["-"] * (epochs - len(rows))
    seconds = f"{sum(r['epoch_time_s'] for r in rows) / len(rows):.0f}" if rows else "-"
    test = "-"
    summary = ExperimentPaths(out / name).test_summary()
    if summary.is_file() and len(rows) == 9:  # the test of the whole schedule, not of a pause
        result = read_summary(summary)
        test = f"{100 * result['ensemble_test_accuracy']:.2f}% +- {100 * result['ensemble_test_confidence_95']:.2f}%"
    print(f"| {name} | " + " | ".join(accuracies) + f" | {seconds} | {test} |")
PY
