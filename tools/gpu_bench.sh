#!/usr/bin/env bash
# The train-step benchmark on one lent GPU, in one call that fits a short lease:
#   bash tools/gpu_bench.sh OUTDIR [SECONDS]
# 1. versions and devices; 2. the llama8b code path at a toy size (fails fast, in about a minute,
# on an API or environment problem before any 8B weights are built); 3. the goal's shape, the
# whole Llama-3.1-8B train step (16 x 512 tokens); 4. while time is left, 16 of its 32 layers
# with both sides recomputing each layer, then with neither side forced to recompute.
# Each run's log, and the 8B runs' JSON, land in OUTDIR (8 files at most). SECONDS (default 580)
# is the whole script's budget: no run starts that could not finish inside it.
set -u -o pipefail
out=${1:?usage: bash tools/gpu_bench.sh OUTDIR [SECONDS]}
budget=${2:-580}
mkdir -p "$out"
# A device machine may run the bare checkout with its own python (no `make setup`): latro_jax from here.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
start=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
"$python" -c "
import jax, flax, optax, orbax.checkpoint as ocp, chex, transformers, torch
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__,
      'chex', chex.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)
print(jax.devices(), torch.cuda.is_available())
print(jax.devices()[0].platform)
" 2>&1 | tee "$out/versions.txt" || exit 1
gpu=$(tail -n 1 "$out/versions.txt")  # the platform JAX runs on, the check's last line

# run NAME NEEDED_SECONDS ARGS...: one bench run, skipped when fewer than NEEDED seconds are left.
run() {
    local name=$1 needed=$2 left
    shift 2
    left=$((budget - (SECONDS - start)))
    if ((left < needed)); then
        echo "== $name: skipped ($left s left, needs about $needed)"
        return 0
    fi
    echo "== $name: bench.py $* (limit $left s)"
    timeout "$left" "$python" tools/bench.py --parts train "$@" 2>&1 | tee "$out/$name.log"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

run tiny 60 --config llama8b-tiny || exit 1
if [[ $gpu != gpu ]]; then
    echo "== JAX sees no GPU ($gpu): the 8B shapes are not run"
    exit 0
fi
run 8b 240 --config llama8b --json "$out/8b.json"
run 16-full 150 --config llama8b --layers 16 --remat full --json "$out/16-full.json"
run 16-nockpt 150 --config llama8b --layers 16 --no-hf-gradient-checkpointing --json "$out/16-nockpt.json"
echo "== done after $((SECONDS - start)) s"
grep -H "train step latro-jax / transformers\|train step tokens/s\|MFU\|seconds per train step" "$out"/*.log
