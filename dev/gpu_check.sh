#!/usr/bin/env bash
# Every GPU number the README lacks, in at most 4 minutes on a machine with one GPU. Each stage of
# bench.py runs in a process of its own under its own time limit, most valuable first: the
# environment; the paper's training step (R-50 L1 H2048 at 224, batch 32, bf16 autocast,
# channels-last) on synthetic batches, eager then compiled; the same step fed from 640x480 JPEGs,
# decoded and augmented by the DataLoader workers and on the GPU; train.py under a 1-process
# torchrun (NCCL, compiled); beam-search captions; the VOC07-sized SVMs; the data pipeline alone;
# how far the GPU's decoded pixels are from the workers' (dev/device_decode.py).
# Each row is printed the moment it is measured and appended to $ROWS, so a run killed at any
# point keeps every row it finished; a stage past its limit leaves a row that says so.
#
#   bash dev/gpu_check.sh                 # one GPU; rows in out/gpu_check.md
#   bash dev/gpu_check.sh --device=cpu    # every stage's code at tiny sizes on a CPU, < 1 minute
#   ROWS=/tmp/rows.md bash dev/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# the GPU machines have python3 and no python (and a symlink named python loses the environment)
PY=$(command -v python || command -v python3) || { echo "error: no python or python3" >&2; exit 1; }
device=cuda
for arg in "$@"; do
    case $arg in
        --device=*) device=${arg#--device=} ;;
        *) echo "error: unknown argument $arg (only --device=cuda|cpu)" >&2; exit 2 ;;
    esac
done
ROWS=${ROWS:-out/gpu_check.md}
mkdir -p "$(dirname "$ROWS")"
scale=1  # of the time limits, which are the GPU window's
if [ "$device" = cpu ]; then  # tiny sizes: the same code paths, seconds each
    scale=4  # a busy 2-core CI machine: no stage may fail for want of a second
    common=(--device=cpu --models=shapes --shapes_batch=4 --warmup_steps=1 --timed_steps=1
            --dtypes=bfloat16 --data_images=40 --data_workers=2 --caption_images=2
            --svm_images=200 --torchrun_iters=2)
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        { echo "error: no CUDA GPU here (bash dev/gpu_check.sh --device=cpu runs it on a CPU)" >&2;
          exit 1; }
    common=(--device="$device" --models=paper --data_workers="$(nproc)")
fi

measured=0  # stages that gave their rows: none means nothing ran (a python without torch)
stage() {  # stage NAME SECONDS BENCH-FLAGS...: one bench.py stage under a time limit
    local name=$1 limit start=$SECONDS
    limit=$(awk "BEGIN { print $2 * $scale }")
    shift 2
    timeout --kill-after=5 "$limit" "$PY" bench.py --rows_file="$ROWS" "${common[@]}" "$@"
    local status=$?
    [ $status -eq 0 ] && measured=$((measured + 1))
    if [ $status -ne 0 ]; then
        local why="exit $status"
        [ $status -eq 124 ] || [ $status -eq 137 ] && why="stopped at its ${limit} s limit"
        echo "| $name | | $* | not measured: $why | $(( SECONDS - start )) s | |" | tee -a "$ROWS"
    fi
}

{
    echo "## dev/gpu_check.sh --device=$device, $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        sed 's/^/- GPU, driver, memory: /'
    "$PY" -c "import torch, torchvision, os
print(f'- torch {torch.__version__}, torchvision {torchvision.__version__},',
      f'CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()},',
      f'{os.cpu_count()} CPU cores')"
    echo "| stage | what | setting | result | time | peak mem |"
    echo "|---|---|---|---|---|---|"
} | tee -a "$ROWS"
stage "train step (eager)" 35 --stages=train --compile=False
# compiling the paper's model takes minutes on a CPU: there the test suite covers compile
[ "$device" = cpu ] || stage "train step (compiled)" 80 --stages=train --compile=True
stage "train step from JPEGs" 55 --stages=train_data --decode_on=workers,device
stage "torchrun" 45 --stages=torchrun
stage "caption" 12 --stages=caption --compile=False
stage "svm" 8 --stages=svm
stage "data pipeline" 10 --stages=data
# how far the GPU's decoded and augmented pixels are from the workers' (a line, not a row)
timeout 20 "$PY" dev/device_decode.py --device="$device" \
    --n_images="$([ "$device" = cpu ] && echo 8 || echo 64)" | sed 's/^/- /' | tee -a "$ROWS"
echo "rows in $ROWS"
if [ $measured -eq 0 ]; then
    echo "error: no stage was measured (each one's error is above)" >&2
    exit 1
fi
