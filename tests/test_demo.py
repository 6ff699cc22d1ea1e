"""The demo end to end, reduced to fit CI (1.7-2.9 minutes alone): a base model made from scratch, LaTRO improves it."""

import json
import os

import jax
import pytest

from latro_jax import demo
from latro_jax.experiment import ExperimentError, load_experiment
from latro_jax.pretrain import pretrained_base, pretrained_path
from latro_jax.train import run

# The demo at a smaller scale: a 2-layer base model (the demo's has 4) with the full stage 1 (800
# updates: with 400, at any learning rate tried, a base model has not learned the arithmetic yet,
# 4% greedy, and LaTRO cannot lift it), half the LaTRO updates, one validation evaluation of 50
# questions. The 500 test questions stay: the margin is over 3 standard errors of a difference of
# two accuracies (<= 3.2 points). Seeds 0, 1, 2 gave gains of 26.0, 23.2 and 13.8 points
# (tests run seed 0).
REDUCED = ["pretrain.num_layers=2", "train.updates=30", "train.eval_every=30", "data.eval_size=50"]
MARGIN = 0.10


@pytest.mark.solo  # `make test` runs it alone after the others: its run time is part of what it shows
def test_reduced_demo_improves_the_base_model(tmp_path, monkeypatch):
    exp = load_experiment("demo", REDUCED + [f"train.output_dir={tmp_path}"])
    compiled, stage3 = [], []  # XLA compilations; how many there were when stage 3 began

    def listen(event, seconds, **_):
        if event.endswith("backend_compile_duration"):
            compiled.append(event)

    load_policy = demo.load_policy

    def load_base(*args, **kwargs):  # stage 3 begins by loading the base model
        stage3.append(len(compiled))
        return load_policy(*args, **kwargs)

    monkeypatch.setattr(demo, "load_policy", load_base)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        results = demo.run_demo(exp, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    accuracy = results["accuracy"]
    assert accuracy["latro"]["greedy"] >= accuracy["base"]["greedy"] + MARGIN, results
    out = os.path.join(tmp_path, "demo", "seed0")
    with open(os.path.join(out, "results.md")) as f:
        assert "| LaTRO |" in f.read()
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    with open(os.path.join(out, "latro", "metrics.jsonl")) as f:
        assert sum("reward_mean" in line for line in f) == 30
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["accuracy"] == accuracy and not results["stage1_cached"]
    # Stage 3 evaluates the three models with the programs the trainers' evaluations compiled
    # (one mesh, one layout of params, one batch shape per mode): nothing compiles again.
    assert stage3 and stage3[0] > 0, "the listener heard no compilation of stages 1-2"
    assert compiled[stage3[0]:] == [], f"stage 3 compiled {len(compiled) - stage3[0]} programs"
    # stage 1 is cached: asking again returns the same model without training it again
    base = pretrained_path(exp)
    stamp = os.path.getmtime(os.path.join(base, "model_config.json"))
    assert pretrained_base(exp, run, progress=False) == base
    assert os.path.getmtime(os.path.join(base, "model_config.json")) == stamp


def test_pretraining_needs_no_base_model_and_a_tokenizer():
    with pytest.raises(ExperimentError, match="model.checkpoint/model.hf"):
        load_experiment("demo", ["model.checkpoint=somewhere"])
    with pytest.raises(ExperimentError, match="pretrain.hidden_size"):
        load_experiment("demo", ["pretrain.hidden_size=48"])
