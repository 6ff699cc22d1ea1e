"""The released recipe (../shared/LATRO.md), shared by the paper's experiments. Where the released
code departs from the paper's method, the paper's is kept and a setting gives the release's:
objective.reference_compat (R with the extra token before the answer) and
objective.nonstop_group=3 (the non-stop penalty's mean over each GPU's 3 questions)."""

from __future__ import annotations

from latro_jax.experiment import DataSpec, Experiment, ModelSpec, OptimSpec, RolloutSpec, TrainSpec
from latro_jax.objective import ObjectiveConfig

MODELS = {
    "llama": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral": "mistralai/Mistral-7B-Instruct-v0.3",
    "phi": "microsoft/Phi-3.5-mini-instruct",
}
# K=16 rationales of up to 500 tokens for 24 questions per update. "6 epochs" of GSM8K's 7,473
# rationales-as-episodes is 117 updates; "12 epochs" of ARC's 1,119 is 35. beta 0.05 / 0.25.
TASKS = {
    "gsm8k": dict(beta=0.05, updates=117),
    "arc_challenge": dict(beta=0.25, updates=35),
}


def latro(name: str, model: str, task: str) -> Experiment:
    recipe = TASKS[task]
    return Experiment(
        name=name,
        model=ModelSpec(hf=MODELS[model], dtype="bfloat16", remat="projections"),
        data=DataSpec(task=task),
        rollout=RolloutSpec(num_samples=16, max_new_tokens=500, temperature=1.0),
        objective=ObjectiveConfig(beta=recipe["beta"], sft_coef=0.0),
        optim=OptimSpec(learning_rate=5e-7, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
        train=TrainSpec(method="latro", questions_per_update=24, micro_batch=4, score_batch=16, updates=recipe["updates"]),
    )


def sft(name: str, model: str, task: str) -> Experiment:
    """The paper's SFT baseline: cross-entropy on the gold rationale (GSM8K: the solution with
    "####" replaced by "The answer is"; ARC: "The answer is {gold}."), loss on the completion.
    LATRO.md gives no SFT hyperparameters; these (3 epochs, lr 1e-6, batch 24) are ours."""
    base = latro(name, model, task)
    epochs_of_updates = {"gsm8k": 3 * 6973 // 24, "arc_challenge": 3 * 1119 // 24}[task]
    return Experiment(
        name=name,
        model=base.model,
        data=base.data,
        rollout=base.rollout,
        objective=base.objective,
        optim=OptimSpec(learning_rate=1e-6),
        train=TrainSpec(method="sft", questions_per_update=24, micro_batch=4, updates=epochs_of_updates,
                        eval_every=100, save_every=100),
    )
