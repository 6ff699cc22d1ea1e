"""Train an experiment: `python tools/train.py EXP [section.field=value ...]` (or `make train EXP=...`).

    python tools/train.py gsm8k_llama
    python tools/train.py gsm8k_llama train.updates=2 rollout.num_samples=4 model.checkpoint=ckpt/llama

Rerunning the same command resumes from the run's latest checkpoint. SIGTERM or Ctrl-C stops
after the current update and saves; a second Ctrl-C aborts without saving.

Many devices: `mesh.data=2 mesh.fsdp=-1 mesh.tensor=1` lays the run out on a mesh (default: fsdp
over every device). Many hosts: start the same command on each, with `distributed.coordinator_address=
host0:port distributed.num_processes=N distributed.process_id=i` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; or `distributed.auto_detect=true` on TPU pods, SLURM, Open MPI).
The output directory must be one that every host sees.
"""

from __future__ import annotations

import sys

import _cli


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    from latro_jax.experiment import ExperimentError, experiment_module, load_experiment
    from latro_jax.sharding import initialize_distributed
    from latro_jax.train import Interrupted, run

    exp = load_experiment(sys.argv[1], sys.argv[2:])
    try:
        initialize_distributed(exp.distributed)  # before anything touches a device
    except ValueError as e:
        raise ExperimentError(str(e)) from None
    runner = getattr(experiment_module(sys.argv[1]), "run", run)  # the demo runs its three stages
    try:
        result = runner(exp)
    except Interrupted as e:
        print(f"\n{exp.name}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"\n{exp.name}: aborted without saving; {exp.run_dir}/checkpoints holds the latest save", file=sys.stderr)
        sys.exit(130)
    if runner is run:
        summary = {k: round(v, 4) for k, v in result.items() if k.endswith("accuracy")}
        print(f"{exp.name}: {result['step']} updates in {exp.run_dir} {summary}")


if __name__ == "__main__":
    _cli.run(main)
