"""Your own task: LaTRO on your own (question, gold answer) pairs, the starting point to copy.

    make train EXP=custom data.path=my_qa.jsonl data.question_field=q data.answer_field=a \
        data.match=normalized model.hf=Qwen/Qwen2.5-0.5B-Instruct
    make eval MODEL=runs/custom/best/<step> ARGS="--split validation"     # the run's own task settings

Every data.* setting (fields, templates, match rules, sources) is in the README's "Your own task".
The model and the data are the user's to name: model.hf (or model.checkpoint) and data.path.
"""

from latro_jax.experiment import DataSpec, Experiment, ModelSpec, OptimSpec, RolloutSpec, TrainSpec
from latro_jax.objective import ObjectiveConfig


def config():
    return Experiment(
        name="custom",
        model=ModelSpec(dtype="bfloat16"),
        data=DataSpec(task="custom", question_field="question", answer_field="answer", match="normalized",
                      eval_size=200),
        rollout=RolloutSpec(num_samples=8, max_new_tokens=256, temperature=1.0),
        # LaTRO's reward: log pi(answer | question, rationale). objective.reward=mean_prob and
        # objective.reward_baseline=no_rationale give RLPR's (then objective.nonstop_coef=0).
        objective=ObjectiveConfig(beta=0.05),
        optim=OptimSpec(learning_rate=5e-7),
        train=TrainSpec(method="latro", questions_per_update=16, micro_batch=4, updates=100, eval_every=20,
                        save_every=20),
    )
