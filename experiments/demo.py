"""The built-in default: LaTRO on synthetic arithmetic with a model made here, on a CPU in minutes.

    make train EXP=demo                      # stages 1-3 (stage 1 is cached for later runs)
    make train EXP=demo train.seed=1         # another seed: its own base model and results

Results: runs/demo/seed<seed>/results.md and curves.png. See latro_jax/demo.py.
"""

from latro_jax.demo import run_demo
from latro_jax.experiment import DataSpec, Experiment, ModelSpec, OptimSpec, PretrainSpec, RolloutSpec, TrainSpec
from latro_jax.objective import ObjectiveConfig


def config():
    return Experiment(
        name="demo",
        model=ModelSpec(dtype="float32"),  # CPUs compute float32 faster than bfloat16
        data=DataSpec(task="arithmetic", eval_size=200),
        pretrain=PretrainSpec(updates=800, hidden_size=64, num_layers=4, head_dim=32, batch=32, learning_rate=2e-3),
        rollout=RolloutSpec(num_samples=8, max_new_tokens=48, temperature=1.0),
        objective=ObjectiveConfig(beta=0.05),
        optim=OptimSpec(learning_rate=1e-4, clip_norm=1.0),  # 5e-4 without clipping collapsed 2 seeds of 3
        train=TrainSpec(method="latro", questions_per_update=16, micro_batch=128, updates=60, eval_every=10,
                        save_every=10, maj_k=8),
    )


def run(exp, progress=True):
    return run_demo(exp, progress)
