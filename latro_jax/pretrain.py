"""A base model trained here from scratch, for runs that have no pretrained one (the demo).

With `pretrain.updates > 0` an experiment's starting weights are a small Llama-family model
trained by SFT on the task's training rationales (for the demo's arithmetic: rationales that
slip, see latro_jax.data.synthetic). The result is an ordinary model checkpoint, cached under
`<train.output_dir>/pretrained/<task>-<digest of the settings>`: later runs with the same
settings (including `train.seed`) reuse it, and a crash mid-way resumes from the pre-training
run's own checkpoints beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import jax

from latro_jax.checkpoint import HF_DIR, is_checkpoint, read_config, save_model
from latro_jax.config import ModelConfig
from latro_jax.data.tasks import CUSTOM
from latro_jax.experiment import (
    CUSTOM_FIELDS, Experiment, ExperimentError, ModelSpec, OptimSpec, PretrainSpec, TrainSpec,
)
from latro_jax.model import init_params

SETTINGS_FILE = "pretrain.json"


def base_model_config(spec: PretrainSpec, tokenizer) -> ModelConfig:
    """A Llama-architecture config of the spec's size for `tokenizer`'s vocabulary."""
    return ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=3 * spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.hidden_size // spec.head_dim,
        num_kv_heads=spec.hidden_size // spec.head_dim,
        head_dim=spec.head_dim,
        max_position_embeddings=1024,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )


def _settings(exp: Experiment) -> dict:
    """Everything the pre-trained weights depend on."""
    settings = {"pretrain": dataclasses.asdict(exp.pretrain), "task": exp.data.task, "source": exp.data.source,
                "train_split": exp.data.train_split, "tokenizer": exp.model.tokenizer, "seed": exp.train.seed}
    if exp.data.task == CUSTOM:
        settings["data"] = {field: getattr(exp.data, field) for field in CUSTOM_FIELDS}
    if exp.data.task == "arithmetic":
        from latro_jax.data.synthetic import VERSION

        settings["data_version"] = VERSION
    return settings


def pretrained_path(exp: Experiment) -> str:
    digest = hashlib.sha256(json.dumps(_settings(exp), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(exp.train.output_dir, "pretrained", f"{exp.data.task}-{digest}")


def _tokenizer_files(exp: Experiment, directory: str):
    """Write the tokenizer to `directory`: the model.tokenizer one, or the arithmetic task's own."""
    from latro_jax.data.prompts import load_tokenizer

    if exp.model.tokenizer:
        tokenizer = load_tokenizer(exp.model.tokenizer)
        tokenizer.save_pretrained(directory)
        return tokenizer
    if exp.data.task != "arithmetic":
        raise ExperimentError("pretrain.updates > 0 needs model.tokenizer (an HF tokenizer directory or hub id) "
                              f"for task {exp.data.task!r}")
    from latro_jax.data.synthetic import build_tokenizer

    return build_tokenizer(directory)


def pretrained_base(exp: Experiment, train: Callable[..., dict], progress: bool = True) -> str:
    """The base model checkpoint of `exp` (pretrain.updates > 0), trained now unless cached, by
    `train` (`latro_jax.train.run`) as an SFT run."""
    path = pretrained_path(exp)
    if is_checkpoint(path):
        return path
    if jax.process_count() > 1:  # every process would train (and write) the same model
        raise ExperimentError(
            f"{path} does not exist yet and a multi-process run does not pre-train its base model: run the "
            "same command once in a single process first"
        )
    spec = exp.pretrain
    init = path + "-init"
    if not is_checkpoint(init):
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            tokenizer = _tokenizer_files(exp, tokenizer_dir)
            config = base_model_config(spec, tokenizer)
            files = {name: os.path.join(tokenizer_dir, name) for name in os.listdir(tokenizer_dir)}
            save_model(init, config, init_params(config, exp.train.seed), files)
    stage = Experiment(
        name=os.path.basename(path) + "-run",
        model=ModelSpec(checkpoint=init, dtype=exp.model.dtype),
        data=dataclasses.replace(exp.data, sft_target="rationale"),
        rollout=exp.rollout,
        objective=exp.objective,
        optim=OptimSpec(learning_rate=spec.learning_rate, b2=0.99, warmup_steps=spec.warmup_steps, clip_norm=1.0),
        train=TrainSpec(method="sft", questions_per_update=spec.batch, micro_batch=spec.batch, updates=spec.updates,
                        seed=exp.train.seed, eval_every=spec.updates, save_every=max(1, spec.updates // 4),
                        keep_last=1, maj_k=exp.train.maj_k, output_dir=os.path.dirname(path)),
    )
    if progress:
        print(f"stage 1: pre-training a {spec.num_layers}-layer, {spec.hidden_size}-wide model from scratch "
              f"({spec.updates} updates), cached in {path}")
    result = train(stage, progress=progress)
    hf = os.path.join(init, HF_DIR)
    save_model(path, read_config(init), result["params"], {name: os.path.join(hf, name) for name in os.listdir(hf)})
    with open(os.path.join(path, SETTINGS_FILE), "w") as f:
        json.dump(_settings(exp), f, indent=1)
    return path
