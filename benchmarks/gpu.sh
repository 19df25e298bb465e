#!/usr/bin/env bash
# The benchmarks on a CUDA machine, one command, from any directory:
#     bash benchmarks/gpu.sh [SECONDS]        (SECONDS: the overhead runs' budget, default 120)
# For blueberry-seed and blueberry-1b: training-step tokens/s and MFU with bf16 autocast and
# torch.compile, then the harness overhead of a time-budget run. At the seed's size all three models
# (HF Llama only when transformers is installed); at 1b only the seed recipe, with micro-batches of 4,
# so one 80 GB card holds it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-120}"

python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: torch sees no CUDA device")'
hf=()
python -c 'import transformers' 2>/dev/null || { hf=(--ours-only); echo "transformers not installed: our model only"; }

for preset in blueberry-seed blueberry-1b; do
    if [[ $preset == blueberry-1b ]]; then batch=4; models=(--models ours-seed); else batch=16; models=(); fi
    echo "== train_step $preset (batch $batch, bf16 autocast, compiled)"
    python -m benchmarks.train_step --device cuda --compile --precision bf16 \
        --preset "$preset" --batch "$batch" ${hf[@]+"${hf[@]}"} ${models[@]+"${models[@]}"}
    echo "== overhead $preset ($seconds s budget)"
    python -m benchmarks.overhead --device cuda --preset "$preset" --seconds "$seconds" \
        --set train.micro_batch="$batch"
done
