"""Mutation check of the test suite: each one-line bug below must make the tests named beside it
fail. Each runs in a private copy of the working tree (never this checkout), so it is safe
beside other work:

    .venv/bin/python tests/mutations.py                 # every mutation (~10 minutes here)
    .venv/bin/python tests/mutations.py --list
    .venv/bin/python tests/mutations.py batch_indices_repeat_at_epoch_boundary best_keeps_the_last

The named tests first run unmutated and must pass. A mutation is killed when its tests fail
(pytest's status 1); one whose tests pass is SURVIVED, and any other status (a collection error,
a test that no longer exists) is an ERROR; either makes the exit status 1. Not part of
`make test`: it reruns parts of the suite once per mutation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DATA = os.path.abspath(os.environ.get("LATRO_TEST_DATA", os.path.join(REPO, "..", "shared", "data")))


class Mutation(NamedTuple):
    name: str
    path: str  # relative to the repository
    old: str  # occurs exactly once in `path`
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail


MUTATIONS = (
    Mutation(
        "micro_batch_gradients_averaged", "latro_jax/update.py",
        "    grad_norm = optax.global_norm(grads)",
        "    grads = jax.tree.map(lambda g: g / jax.tree.leaves(micro)[0].shape[0], grads); "
        "grad_norm = optax.global_norm(grads)",
        ("tests/test_train.py::test_update_accumulates_the_whole_batch_gradient",),
    ),
    Mutation(
        "micro_batch_loss_mean_per_micro_batch", "latro_jax/update.py",
        "    loss_fn = functools.partial(rows_loss, config, objective, n, score_from)",
        "    loss_fn = functools.partial(rows_loss, config, objective, micro_batch, score_from)",
        ("tests/test_train.py::test_update_accumulates_the_whole_batch_gradient",),
    ),
    Mutation(
        "nonstop_mean_per_chunk", "latro_jax/rollout.py",
        "    scored = advantages_of(objective, k, *concat(*parts))",
        "    scored = advantages_of(dataclasses.replace(objective, nonstop_group=chunk), k, *concat(*parts))",
        ("tests/test_train.py::test_rollout_in_chunks_takes_advantages_over_the_whole_batch",),
    ),
    Mutation(
        "answer_reward_without_first_answer_token", "latro_jax/rollout.py",
        "        answer=masked_sum(cont_logprobs[:, 1:], cont_mask[:, 2:]), last_context=cont_logprobs[:, 0],",
        "        answer=masked_sum(cont_logprobs[:, 2:], cont_mask[:, 3:]), last_context=cont_logprobs[:, 0],",
        ("tests/test_train.py::test_cached_answer_reward_equals_full_rescoring",),
    ),
    Mutation(
        "finished_rows_scored_as_unfinished", "latro_jax/rollout.py",
        "        objective, k, scores.policy, scores.reference, scores.answer, scores.finished, scores.last_context",
        "        objective, k, scores.policy, scores.reference, scores.answer, scores.finished & False, "
        "scores.last_context",
        ("tests/test_experiments.py::test_recipe_objective_on_rows_that_finish",),
    ),
    Mutation(
        "stop_first_listed_not_longest", "latro_jax/sampling.py",
        "        cut_seq = s.step + 1 - jnp.max(jnp.where(seq_hit, seq_lengths, 0), axis=-1)",
        "        cut_seq = s.step + 1 - seq_lengths[jnp.argmax(seq_hit, axis=-1)]",
        ("tests/test_sampling.py::test_stop_rule_on_scripted_draws", "tests/test_data.py::test_stop_on_realistic_rationales"),
    ),
    Mutation(
        "same_key_every_decode_step", "latro_jax/sampling.py",
        "        rng, key = jax.random.split(s.rng)",
        "        rng, key = s.rng, s.rng",
        ("tests/test_sampling.py::test_three_token_draws_follow_the_model",),
    ),
    Mutation(
        "shared_prefill_tiled_not_repeated", "latro_jax/sampling.py",
        "    cache, logits = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0) if a.ndim else a, (cache, logits))",
        "    cache, logits = jax.tree.map(lambda a: jnp.tile(a, (k,) + (1,) * (a.ndim - 1)) if a.ndim else a, "
        "(cache, logits))",
        ("tests/test_sampling.py::test_three_token_draws_follow_the_model",),
    ),
    Mutation(
        "batch_indices_repeat_at_epoch_boundary", "latro_jax/data/batches.py",
        "        order = _epoch_order(num_examples, seed, epoch)",
        "        order = _epoch_order(num_examples, seed, start // num_examples)",
        ("tests/test_batches.py::test_each_epoch_draws_every_example_once",),
    ),
    Mutation(
        "batch_indices_same_order_every_epoch", "latro_jax/data/batches.py",
        "        order = _epoch_order(num_examples, seed, epoch)",
        "        order = _epoch_order(num_examples, seed, 0)",
        ("tests/test_batches.py::test_each_epoch_draws_every_example_once",),
    ),
    Mutation(
        "sft_mask_includes_prompt", "latro_jax/data/batches.py",
        "        completion_mask[i, len(p) : len(p) + len(c)] = True",
        "        completion_mask[i, : len(p) + len(c)] = True",
        ("tests/test_batches.py::test_sft_rows_fed_to_the_update",),
    ),
    Mutation(
        "sft_rationale_without_end_token", "latro_jax/data/batches.py",
        "            rationales = iter(encode_texts(tokenizer, [e.rationale + fmt.end_token",
        "            rationales = iter(encode_texts(tokenizer, [e.rationale",
        ("tests/test_batches.py::test_sft_rows_fed_to_the_update",),
    ),
    Mutation(
        "sft_target_ignored", "latro_jax/data/batches.py",
        '            gold = [self.sft and self.exp.data.sft_target != "answer" and e.rationale is not None for e in examples]',
        "            gold = [self.sft and e.rationale is not None for e in examples]",
        ("tests/test_batches.py::test_sft_rows_fed_to_the_update",),
    ),
    Mutation(
        "lora_adapters_sharded_like_the_base", "latro_jax/train.py",
        "        params = jax.jit(init, out_shardings=replicated)(",
        '        params = jax.jit(init, out_shardings=NamedSharding(mesh, PartitionSpec("fsdp")))(',
        ("tests/test_lora_mesh.py::test_lora_on_a_mesh_equals_one_device",),
    ),
    Mutation(
        "best_keeps_the_lowest", "latro_jax/runs.py",
        'best_fn=lambda m: m["greedy_accuracy"], best_mode="max"',
        'best_fn=lambda m: m["greedy_accuracy"], best_mode="min"',
        ("tests/test_run_loop.py::test_best_keeps_the_most_accurate_step_and_checkpoints_the_last_few",),
    ),
    Mutation(
        "best_keeps_the_last", "latro_jax/runs.py",
        '        self.best = manager("best", max_to_keep=1, best_fn=lambda m: m["greedy_accuracy"], best_mode="max")',
        '        self.best = manager("best", max_to_keep=1)',
        ("tests/test_run_loop.py::test_best_keeps_the_most_accurate_step_and_checkpoints_the_last_few",),
    ),
    Mutation(
        "keep_last_off_by_one", "latro_jax/runs.py",
        '        self.latest = manager("checkpoints", max_to_keep=exp.train.keep_last)',
        '        self.latest = manager("checkpoints", max_to_keep=exp.train.keep_last + 1)',
        ("tests/test_run_loop.py::test_best_keeps_the_most_accurate_step_and_checkpoints_the_last_few",),
    ),
    Mutation(
        "lr_from_the_update_index", "latro_jax/train.py",
        '                metrics["lr"] = float(setup.schedule(applied))',
        '                metrics["lr"] = float(setup.schedule(step))',
        ("tests/test_run_loop.py::test_a_skipped_update_leaves_params_and_the_schedule_where_they_were",),
    ),
    Mutation(
        "lr_decay_off_by_one", "latro_jax/update.py",
        "    decay = optax.linear_schedule(spec.learning_rate, 0.0, updates - spec.warmup_steps)",
        "    decay = optax.linear_schedule(spec.learning_rate, 0.0, updates - spec.warmup_steps + 1)",
        ("tests/test_run_loop.py::test_logged_learning_rate_is_optax_schedule_without_warmup",),
    ),
    Mutation(
        "skipped_update_counted", "latro_jax/train.py",
        '                applied += not metrics["skipped"]',
        "                applied += 1",
        ("tests/test_run_loop.py::test_a_skipped_update_leaves_params_and_the_schedule_where_they_were",),
    ),
    Mutation(
        "resume_from_step_zero", "latro_jax/runs.py",
        '        return restored.state, restored.meta["step"]',
        '        return restored.state, 0',
        ("tests/test_run_loop.py::test_sigterm_and_ctrl_c_save_exit_130_and_the_same_command_resumes",),
    ),
    Mutation(
        "model_hf_converted_every_run", "latro_jax/train.py",
        "    elif exp.model.hf and not os.path.isdir(checkpoint):",
        "    elif exp.model.hf:",
        ("tests/test_run_loop.py::test_model_hf_is_converted_into_the_run_once",),
    ),
    Mutation(
        "sigterm_not_handled", "latro_jax/runs.py",
        "for s in (signal.SIGTERM, signal.SIGINT)}",
        "for s in (signal.SIGINT,)}",
        ("tests/test_run_loop.py::test_sigterm_and_ctrl_c_save_exit_130_and_the_same_command_resumes",),
    ),
)


def copy_tree(destination: str) -> None:
    """The checkout's tracked and untracked-but-not-ignored files (no .venv, no runs/)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))


def apply(root: str, mutation: Mutation) -> None:
    path = os.path.join(root, mutation.path)
    with open(path) as f:
        text = f.read()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the text to mutate occurs {text.count(mutation.old)} times in "
                         f"{mutation.path} (expected once): update tests/mutations.py")
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))


def run_tests(root: str, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "LATRO_TEST_DATA": DATA, "PYTHONPATH": root}  # the mutated copy, not the installed one
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=root,
                          env=env, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return done.returncode, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.path}  ->  {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"unknown mutation(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] or list(MUTATIONS)
    for mutation in chosen:  # each still names one place in the code, before anything runs
        with open(os.path.join(REPO, mutation.path)) as f:
            if f.read().count(mutation.old) != 1:
                print(f"{mutation.name}: its text does not occur exactly once in {mutation.path}: update "
                      "tests/mutations.py", file=sys.stderr)
                return 2
    # The named tests must pass on the tree as it is, or a failure would say nothing of a mutation.
    with tempfile.TemporaryDirectory(prefix="latro-mutation-") as root:
        copy_tree(root)
        status, summary = run_tests(root, tuple(dict.fromkeys(t for m in chosen for t in m.tests)))
    print(f"baseline (no mutation): {summary}", flush=True)
    if status != 0:
        print("the named tests do not pass unmutated: fix them first", file=sys.stderr)
        return 1
    survived, broken = [], []
    for mutation in chosen:
        with tempfile.TemporaryDirectory(prefix="latro-mutation-") as root:
            copy_tree(root)
            apply(root, mutation)
            started = time.perf_counter()
            status, summary = run_tests(root, mutation.tests)
        # pytest: 1 = tests failed; 0 = all passed; anything else (collection error, no such test) says nothing
        verdict = {0: "SURVIVED", 1: "killed"}.get(status, "ERROR")
        print(f"{verdict:8s} {mutation.name} ({time.perf_counter() - started:.0f} s): {summary}", flush=True)
        (survived if status == 0 else broken if status != 1 else []).append(mutation.name)
    if survived or broken:
        print(f"survived: {', '.join(survived) or 'none'}; errors: {', '.join(broken) or 'none'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
