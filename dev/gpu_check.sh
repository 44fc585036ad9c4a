#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in five stages that each fit in a few minutes of an H100:
#
#   bash dev/gpu_check.sh tests  OUT   # the GPU tests, test_gpt2.py at fp32 / TF32 / bf16 on the fixture
#                                      # and on a GPT-2 124M-shaped reference (dev/make_reference.py)
#   bash dev/gpu_check.sh bench  OUT   # dev/bench.py --device cuda in TF32 and in bf16 against PyTorch,
#                                      # with the blocked and with the flash attention
#   bash dev/gpu_check.sh memory OUT   # the largest batch that fits at T=1024, in fp32 and in bf16
#   bash dev/gpu_check.sh curves OUT   # GPT-2 124M from scratch on Tiny Shakespeare, fp32 (TF32) and
#                                      # bf16, the same 400 steps: both logs, and both curves on one plot
#   bash dev/gpu_check.sh profile OUT  # Nsight Compute on the flash attention kernels of one d12 step
#                                      # (B=8, T=1024) in bf16 and TF32: time, throughput, occupancy
#
# OUT is a folder for the logs (created). The token files are looked for in $DATA (default data/; relative to the repository),
# as prepro_tinyshakespeare.py writes them. Needs CuPy (and ml_dtypes for bf16); PyTorch for the
# references and the benchmark's yardsticks; matplotlib for the plot (skipped without it).
set -uo pipefail
usage="usage: dev/gpu_check.sh tests|bench|memory|curves|profile OUT"
stage=${1:?$usage}
out=$(mkdir -p "${2:?$usage}" && cd "$2" && pwd)  # (absolute: the stages run from the repository's root)
data=${DATA:-data}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1

case "$stage" in
tests)
    python3 -m pytest -q -rs tests/test_cuda_layers.py tests/test_cuda.py > "$out/pytest_gpu.log" 2>&1
    tail -3 "$out/pytest_gpu.log"
    # every kernel through this machine's NVRTC, with CuPy's options: registers and spills
    python3 dev/check_kernels.py > "$out/check_kernels.log" 2>&1
    echo "check_kernels: exit $? $(tail -1 "$out/check_kernels.log")"
    fixture=(--checkpoint tests/fixtures/tiny_gpt2.bin --state tests/fixtures/tiny_gpt2_debug_state.bin
             --expected-losses tests/fixtures/tiny_gpt2_expected_losses.json)
    ref=/tmp/gpu_check_ref
    python3 dev/make_reference.py --depth d12 --out-dir "$ref" > "$out/make_reference.log" 2>&1
    d12=(--checkpoint "$ref/gpt2_d12.bin" --state "$ref/gpt2_d12_debug_state.bin"
         --expected-losses "$ref/gpt2_d12_expected_losses.json")
    for model in fixture d12; do
        [ "$model" = fixture ] && args=("${fixture[@]}") || args=("${d12[@]}")
        for precision in "--tf32 0" "--tf32 1" "--dtype bf16" "--tf32 1 --attention flash" "--dtype bf16 --attention flash"; do
            name="test_gpt2_${model}_$(echo "$precision" | tr -d ' -')"
            python3 test_gpt2.py --device cuda $precision "${args[@]}" > "$out/$name.log" 2>&1
            echo "$name: exit $? $(grep -E '^(max abs|norm-wise|overall)' "$out/$name.log" | tr '\n' ' ')"
        done
    done
    ;;
bench)
    for attention in blocked flash; do
        python3 dev/bench.py --device cuda --attention $attention --torch-variants tf32-sdpa \
            --data "$data/tiny_shakespeare_train.bin" > "$out/bench_tf32_$attention.log" 2>&1
        python3 dev/bench.py --device cuda --dtype bf16 --attention $attention --torch-variants bf16-sdpa,tf32-sdpa \
            --data "$data/tiny_shakespeare_train.bin" > "$out/bench_bf16_$attention.log" 2>&1
    done
    grep -hE "^  (ours|pytorch)|^    " "$out"/bench_*.log
    ;;
memory)
    for dtype in bf16 fp32; do
        python3 dev/bench.py --device cuda --dtype "$dtype" --find-max-batch > "$out/max_batch_$dtype.log" 2>&1
    done
    grep -hE "^ +[0-9]+ |out of memory" "$out"/max_batch_*.log
    ;;
curves)
    for dtype in fp32 bf16; do
        python3 train_gpt2.py --device cuda --dtype "$dtype" --init d12 -b 8 -t 1024 --steps 400 --lr 6e-4 \
            --warmup-steps 50 --lr-min-frac 0.1 --weight-decay 0.1 --decay-2d-only --grad-clip 1.0 \
            --val-every 25 --val-batches 3 --sample-every 0 --train-data "$data/tiny_shakespeare_train.bin" \
            --val-data "$data/tiny_shakespeare_val.bin" --log "$out/d12_$dtype.log" > "$out/train_d12_$dtype.out" 2>&1
        echo "$dtype: exit $?, $(grep -c '^step' "$out/train_d12_$dtype.out") steps, last val: $(grep 'val loss' "$out/train_d12_$dtype.out" | tail -1)"
    done
    python3 dev/plot_loss.py "$out/d12_fp32.log" "$out/d12_bf16.log" -o "$out/gpu_loss_fp32_bf16.png" \
        || echo "no plot (pip install matplotlib)"
    ;;
profile)
    # the second step's flash kernels (the first step's 36, 12 layers' forward, dq and dk/dv, skipped:
    # compiles and cuBLAS's first calls), summarized per kernel
    for dtype in bf16 fp32; do
        ncu -k regex:"flash_attention_(forward|backward_dq|backward_dkdv)" --launch-skip 36 --launch-count 36 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --print-summary per-kernel \
            python3 train_gpt2.py --device cuda --dtype "$dtype" --attention flash --init d12 -b 8 -t 1024 \
            --steps 2 --val-every 0 --sample-every 0 --train-data "$data/tiny_shakespeare_train.bin" \
            --val-data "$data/tiny_shakespeare_val.bin" > "$out/ncu_flash_$dtype.log" 2>&1
        echo "$dtype: exit $?"
        grep -E "flash_attention_|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
            "$out/ncu_flash_$dtype.log" | head -40
    done
    ;;
*)
    echo "error: unknown stage $stage: expected tests, bench, memory, curves or profile" >&2
    exit 2
    ;;
esac
