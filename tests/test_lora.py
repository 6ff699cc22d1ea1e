"""LoRA: the initial adapted model is the base, LoRA training lowers the LaTRO loss as full
fine-tuning does while the base stays bit-identical, and the merged export loads in
transformers with the logits of a PEFT-style reference (W += scale * B_peft @ A_peft, in PyTorch).
Tolerance 1e-4 on float32 logits of transformers vs ours (as in test_model)."""

from __future__ import annotations

import copy
import dataclasses
import os

import chex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from latro_jax.checkpoint import load_model, save_model
from latro_jax.convert.hf import export_hf, export_params
from latro_jax.experiment import OptimSpec
from latro_jax import lora as lora_lib
from latro_jax import model
from latro_jax.lora import LoraConfig, LoraRowsLoss, init_adapters
from latro_jax.objective import ObjectiveConfig
from latro_jax.runs import load_run_step
from latro_jax.update import latro_rows_loss, make_optimizer, update
from hf_models import assert_exported_logits, convert, hf_logits, make_hf_model, mixed_batch

OBJECTIVE = ObjectiveConfig(beta=0.05)
LORA = LoraConfig(rank=4, alpha=8.0)
# Jitted once here: op-by-op dispatch of a whole model is far slower than compiling it.
forward = jax.jit(model.forward, static_argnums=0)
merge = jax.jit(lora_lib.merge, static_argnums=0)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random transformers Llama (3.1 rope scaling) and its conversion: (torch model,
    ModelConfig, params). Converting is faster here than `init_params`'s per-shape draws."""
    model = make_hf_model("llama")
    config, base = convert(model, tmp_path_factory.mktemp("base"))
    return model, config, base


def test_zero_b_gives_the_base_logits_exactly(hf_base):
    _, config, base = hf_base
    adapters = init_adapters(config, LORA, jax.random.key(1))
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(adapters)[::2])  # A is random, not 0
    ids, mask, positions = (jnp.asarray(x.numpy()) for x in mixed_batch())
    expected, _ = forward(config, base, ids, positions, mask.astype(bool))
    actual, _ = forward(config, merge(LORA, base, adapters), ids, positions, mask.astype(bool))
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def latro_rows(vocab: int, seed: int = 0) -> dict:
    """A hand-built rollout batch of 2 questions x K=4 rows, [8, 16]: prompt slots 0-3 (row 0
    left-padded), a rationale of 3-8 tokens, a 2-token answer, right padding; advantages set by
    hand (they sum to 0 over each group of K, as RLOO's do)."""
    rng = np.random.default_rng(seed)
    n, slots, prompt = 8, 16, 4
    tokens = rng.integers(3, vocab, (n, slots)).astype(np.int32)
    position = np.arange(slots)[None]
    rationale_end = prompt + rng.integers(3, 9, (n, 1))
    rationale_mask = (position >= prompt) & (position < rationale_end)
    answer_mask = (position >= rationale_end) & (position < rationale_end + 2)
    attention_mask = (position < rationale_end + 2) & ~((np.arange(n)[:, None] == 0) & (position == 0))
    advantages = np.array([1.0, -0.5, 0.25, -0.75, -1.0, 0.5, 0.3, 0.2], np.float32)
    return {name: jnp.asarray(x) for name, x in dict(
        tokens=tokens, attention_mask=attention_mask, rationale_mask=rationale_mask, answer_mask=answer_mask,
        advantages=advantages).items()}


def test_lora_training_lowers_the_latro_loss_and_keeps_the_base(hf_base):
    """Several updates on one fixed rollout batch, full fine-tuning vs LoRA: both lower the
    surrogate loss of that batch; LoRA's base comes back bit-identical."""
    _, config, base = hf_base
    adapters = init_adapters(config, LORA, jax.random.key(1))
    rows, score_from = latro_rows(config.vocab_size), 4
    base_before = jax.tree.map(np.array, base)

    def train(loss_fn, params, frozen, steps=4):
        optimizer = make_optimizer(OptimSpec(learning_rate=1e-2), steps + 1)
        # Committed to the device like update's outputs, so the second call does not recompile.
        params, opt_state = jax.device_put((params, optimizer.init(params)), jax.devices()[0])
        losses = []
        for _ in range(steps + 1):  # the last call's loss is the loss after `steps` updates
            params, opt_state, metrics = update(config, OBJECTIVE, optimizer, 4, loss_fn, score_from, params,
                                                opt_state, rows, frozen)
            assert int(metrics["skipped"]) == 0
            losses.append(float(metrics["loss"]))  # the loss before this call's step
        return params, opt_state, losses

    _, _, full_losses = train(latro_rows_loss, jax.tree.map(jnp.copy, base), None)
    trained, opt_state, lora_losses = train(LoraRowsLoss(latro_rows_loss, LORA), adapters, base)
    for losses in (full_losses, lora_losses):
        assert losses[-1] < losses[0] - 1.0, losses
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(adapters)  # AdamW state: adapters only
    assert all(float(jnp.abs(leaf["b"]).max()) > 0 for leaf in jax.tree.leaves(
        trained, is_leaf=lambda x: isinstance(x, dict) and "b" in x))


def test_merged_export_matches_a_peft_style_reference_in_transformers(hf_base, tmp_path):
    hf_model, config, base = hf_base
    model = copy.deepcopy(hf_model)  # gets the PEFT-style update below
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    adapters = init_adapters(config, lora, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 100))
    adapters = jax.tree.map(lambda x: x if float(jnp.abs(x).max()) else 0.05 * jax.random.normal(next(keys), x.shape),
                            adapters)  # a trained-looking B, not 0

    save_model(tmp_path / "merged", config, merge(lora, base, adapters), {})
    export_hf(tmp_path / "merged", tmp_path / "merged_hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", attn_implementation="eager",
                                                    dtype=torch.float32).eval()

    # PEFT's update of an HF [out, in] weight: W += scale * B_peft @ A_peft, A_peft [r, in], B_peft [out, r].
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for module, hf_module in (("attn", layer.self_attn), ("mlp", layer.mlp)):
                for name, ab in adapters["layers"][i][module].items():
                    a_peft = torch.from_numpy(np.array(ab["a"]).reshape(-1, lora.rank).T)
                    b_peft = torch.from_numpy(np.array(ab["b"]).reshape(lora.rank, -1).T)
                    getattr(hf_module, name).weight.add_(lora.scale * b_peft @ a_peft)

    ids, mask, positions = mixed_batch()
    ours, _ = forward(config, merge(lora, base, adapters), jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()),
                      jnp.asarray(mask.numpy(), bool))
    real = mask.numpy().astype(bool)
    reference = hf_logits(model, ids, mask, positions)
    np.testing.assert_allclose(np.asarray(ours)[real], reference[real], atol=1e-4)
    np.testing.assert_allclose(hf_logits(exported, ids, mask, positions)[real], reference[real], atol=1e-4)
    base_logits, _ = forward(config, base, jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()),
                             jnp.asarray(mask.numpy(), bool))
    assert np.abs(np.asarray(base_logits)[real] - reference[real]).max() > 1e-2  # the adapters matter


@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(rank=4, alpha=-1.0), "alpha"),
                                           (dict(rank=4, targets=("qkv",)), "targets")])
def test_bad_lora_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}="):
        LoraConfig(**kwargs)


def test_lora_run_trains_only_adapters_and_resumes_exactly(tmp_path):
    """`model.lora_rank` in a training run: the demo's tiny arithmetic model (pre-trained for a few
    updates) trained with rank-4 adapters; stopped after 1 update and resumed, it ends where an
    uninterrupted run does, and the run's final params are the base with the adapters merged."""
    from latro_jax import train
    from latro_jax.demo import stage_experiments
    from latro_jax.experiment import load_experiment
    from latro_jax.pretrain import pretrained_base

    overrides = [f"train.output_dir={tmp_path}", "pretrain.updates=3", "pretrain.warmup_steps=0", "pretrain.batch=8",
                 "model.lora_rank=4", "train.updates=2", "train.questions_per_update=2", "rollout.num_samples=4",
                 "train.micro_batch=4", "train.eval_every=2", "data.eval_size=4", "train.maj_k=2",
                 "rollout.max_new_tokens=16", "optim.learning_rate=1e-2"]
    exp = stage_experiments(load_experiment("demo", overrides))["latro"]
    config, base = load_model(pretrained_base(load_experiment("demo", overrides), train.run, progress=False))
    straight = train.run(exp, progress=False)
    # `make eval` / `make export` of the run's best step: the adapters merged into the base, as the
    # run's final params; exported, transformers gives their logits.
    step = load_run_step(os.path.join(exp.run_dir, "best", "2"))
    chex.assert_trees_all_equal(step.params, straight["params"])
    export_params(step.config, step.params, step.hf_files, tmp_path / "exported")
    assert_exported_logits(step.config, step.params, tmp_path / "exported")
    resumed_exp = dataclasses.replace(exp, name="resumed")
    assert train.run(resumed_exp, stop_after=1, progress=False)["step"] == 1
    resumed = train.run(resumed_exp, progress=False)
    chex.assert_trees_all_equal(resumed["params"], straight["params"])
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(base))]
    assert any(changed) and not all(changed)  # the adapted projections moved; embeddings and norms did not
