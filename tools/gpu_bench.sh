#!/usr/bin/env bash
# The GPU benchmarks on one lent GPU, in one call that fits a short lease:
#   bash tools/gpu_bench.sh OUTDIR [SECONDS]
# 1. versions and devices; 2. tools/gpu_checks.py: no weight cast or gather inside the compiled
# decode loops, and attention="cudnn" against "xla"; 3. the 8B code paths at toy sizes (fail
# fast, in about a minute, on an API or environment problem before any 8B weights are built);
# 4. the sampler at the Llama-3.1-8B shape (bf16, batch 256, 128-token prompts, 256 new tokens)
# beside transformers generate, with its fraction of the HBM bound; 5. one whole LaTRO update of
# the released recipe's shape (24 questions x K=16, L=500, LoRA r=16; tools/bench_update.py);
# 6. while time is left, the whole 8B train step beside transformers (16 x 512 tokens).
# Each run's log, and the 8B runs' JSON, land in OUTDIR. SECONDS (default 580) is the whole
# script's budget: no run starts that could not finish inside it. On a machine with no GPU it
# runs 1-3 (a dry run).
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

# run NAME NEEDED_SECONDS COMMAND...: one run, skipped when fewer than NEEDED seconds are left.
run() {
    local name=$1 needed=$2 left
    shift 2
    left=$((budget - (SECONDS - start)))
    if ((left < needed)); then
        echo "== $name: skipped ($left s left, needs about $needed)"
        return 0
    fi
    echo "== $name: $* (limit $left s)"
    timeout "$left" "$python" "$@" 2>&1 | tee "$out/$name.log"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

run checks 60 tools/gpu_checks.py  # its failure is reported, not fatal: the timings still matter
run tiny-update 60 tools/bench_update.py --config tiny || exit 1
run tiny 60 tools/bench.py --config llama8b-tiny || exit 1
if [[ $gpu != gpu ]]; then
    echo "== JAX sees no GPU ($gpu): the 8B shapes are not run"
    exit 0
fi
run sampler-8b 200 tools/bench.py --config llama8b --parts sampler --repeats 1 --json "$out/sampler-8b.json"
run update-8b 240 tools/bench_update.py --rollout-batch 12 --json "$out/update-8b.json"
run train-8b 240 tools/bench.py --config llama8b --parts train --json "$out/train-8b.json"
echo "== done after $((SECONDS - start)) s"
grep -H "sampler tokens/s\|fraction of bound\|4x the cache\|whole update\|train step latro-jax / transformers" "$out"/*.log
