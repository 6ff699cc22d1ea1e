"""Faults a long run meets, each against an uninterrupted run of the same tiny experiment (four
updates, saved and evaluated after the second and the fourth):
- a disk that fills during a save (to checkpoints/ or best/) stops the run with one line naming
  the update, the directory and the cause, leaving no temporary directory; the rerun finishes
  it. A disk without room for the state stops it before anything is written;
- a damaged newest checkpoint (a data file cut short, its _METADATA gone) is named, kept aside,
  and the run resumes from the one before it;
- `tools/train.py` killed (SIGKILL) while it evaluates, while it saves best/, and while it saves a
  checkpoint, each time rerun;
- metrics.jsonl is strict JSON (a non-finite metric is null).
Each run ends as the uninterrupted one: the same metrics.jsonl (but the timings), TensorBoard
scalars, samples.txt, eval_<step>.json and params, no log line twice."""

from __future__ import annotations

import errno
import gc
import glob
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import async_path

import latro_jax.train as train
from latro_jax.experiment import load_experiment
from latro_jax.runs import RunLog, SaveError, load_run_step
import test_experiments
import test_run_loop
from conftest import require
from test_experiments import REPO, cli_overrides

stand_ins = test_experiments.stand_ins  # a fixture
one_optimizer_per_schedule = test_run_loop.one_optimizer_per_schedule  # autouse: the runs here compile once
# What orbax leaves of the saves failed here (coroutines of their other writes, callbacks into a
# closed event loop), which Python reports as it collects them, in whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning",
                                        "ignore:coroutine .* was never awaited:RuntimeWarning")

# Four updates, saved and evaluated after the second and the fourth.
SCHEDULE = ["train.eval_every=2", "train.save_every=2"]


def overrides(checkpoint, source, output_dir):
    return cli_overrides(checkpoint, source, output_dir, updates=4) + SCHEDULE


@pytest.fixture(scope="module")
def llama(stand_ins, test_data):
    """The stand-in, its tokenizer beside it (as `tools/train.py` loads it), and the GSM8K rows."""
    checkpoint, tokenizer = stand_ins("llama")
    tokenizer.save_pretrained(os.path.join(checkpoint, "hf"))
    return checkpoint, tokenizer, os.path.dirname(require(os.path.join(test_data, "gsm8k", "train.jsonl")))


@pytest.fixture(scope="module")
def straight(llama, tmp_path_factory):
    """The uninterrupted run: its experiment and result."""
    checkpoint, tokenizer, source = llama
    exp = load_experiment("gsm8k_llama", overrides(checkpoint, source, tmp_path_factory.mktemp("straight")))
    return exp, train.run(exp, tokenizer=tokenizer, progress=False)


def experiment(llama, output_dir):
    checkpoint, _, source = llama
    return load_experiment("gsm8k_llama", overrides(checkpoint, source, output_dir))


def metrics_lines(run_dir):
    """metrics.jsonl without the timings (which differ from run to run); strict JSON."""
    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line, parse_constant=strict) for line in f]
    return [{k: v for k, v in r.items() if not (k.startswith("time_") or k == "tokens_per_s")} for r in records]


def tensorboard_scalars(run_dir):
    """The scalars TensorBoard shows, [(tag, step, value)]: the event files in order, each
    purge (a SessionLog START at step s) dropping the events read before it from step s on."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):  # TFRecords: length (8 bytes), its CRC (4), the event, its CRC (4)
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            if event.session_log.status == SessionLog.START:
                scalars = [s for s in scalars if s[1] < event.step]
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return [s for s in scalars if not (s[0].startswith("time_") or s[0] == "tokens_per_s")]


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def temporary_directories(run_dir):
    return glob.glob(os.path.join(run_dir, "*", "*.orbax-checkpoint-tmp*"))


def assert_ends_as(run_dir, straight, params=None):
    """The run in `run_dir` ended as the uninterrupted one: each log line once and the same, the
    same evaluations, samples and steps kept, the same params (`params` if given, and the last
    checkpoint's), no temporary directory left."""
    exp, result = straight
    assert metrics_lines(run_dir) == metrics_lines(exp.run_dir)
    assert tensorboard_scalars(run_dir) == tensorboard_scalars(exp.run_dir)
    for name in ("samples.txt", "eval_2.json", "eval_4.json"):
        with open(os.path.join(run_dir, name)) as mine, open(os.path.join(exp.run_dir, name)) as theirs:
            assert mine.read() == theirs.read(), name
    for folder in ("checkpoints", "best"):
        assert sorted(os.listdir(os.path.join(run_dir, folder))) == sorted(os.listdir(os.path.join(exp.run_dir,
                                                                                                   folder)))
    if params is not None:
        assert_same_params(params, result["params"])
    assert_same_params(load_run_step(os.path.join(run_dir, "checkpoints", "4")).params, result["params"])
    assert not temporary_directories(run_dir)


def test_the_uninterrupted_run(straight):
    """What the other tests compare with: four updates, two evaluations with their samples, in
    strict JSON; best/ holds one step."""
    exp, result = straight
    lines = metrics_lines(exp.run_dir)
    assert [(m["step"], "loss" in m) for m in lines] == [(1, True), (2, True), (2, False), (3, True), (4, True),
                                                         (4, False)]
    samples = open(os.path.join(exp.run_dir, "samples.txt")).read()
    assert samples.count("==== update 2\n") == 1 and samples.count("==== update 4\n") == 1
    assert len(os.listdir(os.path.join(exp.run_dir, "best"))) == 1
    assert sorted(os.listdir(os.path.join(exp.run_dir, "checkpoints"))) == ["2", "4"]


def cli():
    """tools/_cli.py, which turns a user error into one line and exit status 2."""
    spec = importlib.util.spec_from_file_location("_cli", os.path.join(REPO, "tools", "_cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("folder", ["checkpoints", "best"])
def test_a_full_disk_stops_the_run_with_one_line_and_the_rerun_finishes_it(folder, llama, straight, tmp_path,
                                                                           monkeypatch, capsys):
    """The disk fills while update 2 is saved to `folder`: orbax's writes of files there fail with
    ENOSPC in its background threads (the first: the state's array metadata, after the arrays).
    The run stops at the check before the evaluation (checkpoints/) or once best/ is written, with
    one line naming the update, the directory and the cause, which `tools/train.py` prints as it
    is (exit status 2). The save's temporary directory is gone and nothing after it was done.
    With room again, the same run resumes and ends as the uninterrupted one."""
    exp = experiment(llama, tmp_path)
    target = os.path.join(exp.run_dir, folder, "2")
    write_text = async_path.write_text

    async def full(path, text, *args, **kwargs):
        if str(path).startswith(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(async_path, "write_text", full)
    with pytest.raises(SaveError) as raised:
        train.run(exp, tokenizer=llama[1], progress=False)
    message = f"saving update 2 to {os.path.join(exp.run_dir, folder)} failed: [Errno 28] No space left on device"
    assert str(raised.value) == message
    assert not temporary_directories(exp.run_dir)
    evaluated = folder == "best"  # the save to best/ comes after the evaluation's line
    assert [(m["step"], "loss" in m) for m in metrics_lines(exp.run_dir)] == [(1, True), (2, True)] + [
        (2, False)] * evaluated
    assert not os.path.exists(os.path.join(exp.run_dir, "eval_2.json"))
    assert os.listdir(os.path.join(exp.run_dir, folder)) == []
    assert os.listdir(os.path.join(exp.run_dir, "checkpoints")) == (["2"] if evaluated else [])

    def main():
        raise raised.value

    with pytest.raises(SystemExit) as exited:
        cli().run(main)
    assert exited.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"

    monkeypatch.setattr(async_path, "write_text", write_text)
    resumed = train.run(exp, tokenizer=llama[1], progress=False)
    assert_ends_as(exp.run_dir, straight, resumed["params"])
    gc.collect()


def test_a_disk_without_room_for_a_save_stops_the_run_before_it_writes(llama, tmp_path, monkeypatch):
    """A disk with less room than update 2's state (1 MB): the save fails before orbax writes
    anything, with one line giving the sizes; the run stops there."""
    exp = experiment(llama, tmp_path)
    folder = os.path.join(exp.run_dir, "checkpoints")
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage(path)._replace(free=10**6) if os.fspath(path) == folder else usage(path))
    with pytest.raises(SaveError) as raised:
        train.run(exp, tokenizer=llama[1], progress=False)
    assert re.fullmatch(rf"saving update 2 to {re.escape(folder)} failed: \[Errno 28\] No space left on device "
                        r"\(\d+\.\d MB to write, 1\.0 MB free\)", str(raised.value)), raised.value
    assert os.listdir(folder) == []
    assert [(m["step"], "loss" in m) for m in metrics_lines(exp.run_dir)] == [(1, True), (2, True)]


def cut_short(step_dir):
    """The largest data file of the step's state, cut to half its size."""
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(p)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def no_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("damage", [cut_short, no_metadata])
def test_a_damaged_newest_checkpoint_is_named_kept_and_the_run_resumes_from_the_one_before(damage, llama, straight,
                                                                                          tmp_path, capsys):
    """The uninterrupted run's directory with its newest checkpoint (4) damaged: the rerun names
    it on stderr, moves it aside to 4.damaged-1, resumes from 2 and ends as the uninterrupted
    run did."""
    exp = experiment(llama, tmp_path)
    shutil.copytree(straight[0].run_dir, exp.run_dir)
    checkpoints = os.path.join(exp.run_dir, "checkpoints")
    damage(os.path.join(checkpoints, "4"))
    resumed = train.run(exp, tokenizer=llama[1], progress=False)
    (line,) = capsys.readouterr().err.splitlines()  # one line, not the failed read's leftovers
    assert line.startswith(f"{checkpoints}/4 is damaged (") and line.endswith(
        f"); resuming from {checkpoints}/2 (the damaged one is kept as {checkpoints}/4.damaged-1)"), line
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged-1"]
    os.rename(os.path.join(checkpoints, "4.damaged-1"), os.path.join(tmp_path, "damaged"))
    assert_ends_as(exp.run_dir, straight, resumed["params"])


def test_metrics_are_strict_json_and_tensorboard_keeps_the_values(tmp_path):
    """A non-finite metric (a skipped update's loss) is null in metrics.jsonl; TensorBoard's
    value is as it was."""
    log = RunLog(str(tmp_path), load_experiment("gsm8k_llama", [f"train.output_dir={tmp_path}"]))
    log.write(1, {"loss": float("nan"), "kl_mean": float("inf"), "reward_mean": 0.5, "skipped": 1})
    log.close()
    assert metrics_lines(tmp_path) == [{"step": 1, "loss": None, "kl_mean": None, "reward_mean": 0.5, "skipped": 1}]
    values = {tag: value for tag, _, value in tensorboard_scalars(tmp_path)}
    assert np.isnan(values["loss"]) and values["kl_mean"] == np.inf and values["reward_mean"] == 0.5


# Run in a child process before tools/train.py: $FAULT says where to stop, and hang, writing
# $FAULT_REACHED for the test to kill it there: "evaluate" (the first evaluation, as it starts)
# or "<folder>:<step>" (the save of that update to checkpoints/ or best/, as it writes its
# {"step", "experiment"} record).
HANG_AT_THE_FAULT = """
import os, runpy, sys, time
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler
import latro_jax.train as train

def hang():
    open(os.environ["FAULT_REACHED"], "w").close()
    time.sleep(300)

fault = os.environ["FAULT"]
if fault == "evaluate":
    train.evaluate = lambda *args, **kwargs: hang()
else:
    folder, step = fault.split(":")
    save = JsonCheckpointHandler._save_fn
    async def save_then_hang(self, item, directory):
        if item.get("step") == int(step) and os.sep + folder + os.sep in str(directory):
            hang()
        return await save(self, item, directory)
    JsonCheckpointHandler._save_fn = save_then_hang
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def killed(command, env, fault, tmp_path):
    """Run `command` (tools/train.py ...) until it reaches `fault`, then SIGKILL it."""
    reached = tmp_path / f"reached_{fault.replace(':', '_')}"
    with open(tmp_path / "stderr", "w+") as stderr:  # a file: a pipe left unread could fill and block it
        process = subprocess.Popen([sys.executable, "-c", HANG_AT_THE_FAULT, *command], stderr=stderr, text=True,
                                   env={**env, "FAULT": fault, "FAULT_REACHED": str(reached)})
        deadline = time.time() + 300
        while not reached.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.kill()
        process.wait(timeout=60)
        stderr.seek(0)
        assert reached.exists(), stderr.read()[-3000:]


def test_killed_at_three_points_and_rerun_the_run_ends_as_the_uninterrupted_one(llama, straight, tmp_path):
    """`tools/train.py` is killed (SIGKILL: no handler runs) as it starts evaluating update 2,
    rerun and killed as it saves update 2 to best/ (after the evaluation's line is logged, before
    eval_2.json), rerun and killed as it saves update 4 to checkpoints/, then rerun to the end:
    each rerun resumes from what the kill left (a redone evaluation's line replaces the one logged
    before; the temporary directory of a save cut short is removed), and the run ends as the
    uninterrupted one."""
    checkpoint, tokenizer, source = llama
    command = [os.path.join(REPO, "tools", "train.py"), "gsm8k_llama", *overrides(checkpoint, source, tmp_path)]
    env = {**os.environ,
           # this process's matmul precision (conftest), so that the params compare bit for bit
           "JAX_DEFAULT_MATMUL_PRECISION": jax.config.jax_default_matmul_precision or "",
           # the processes compile the same programs: once
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    run_dir = os.path.join(tmp_path, "gsm8k_llama")

    def logged():
        return [(m["step"], "loss" in m) for m in metrics_lines(run_dir)]

    def listed(folder):
        return sorted(os.listdir(os.path.join(run_dir, folder)))

    killed(command, env, "evaluate", tmp_path)  # update 2 was on disk before the evaluation began
    assert logged() == [(1, True), (2, True)] and listed("checkpoints") == ["2"] and listed("best") == []

    killed(command, env, "best:2", tmp_path)  # it evaluated update 2 first
    assert logged() == [(1, True), (2, True), (2, False)]
    assert "==== update 2\n" in open(os.path.join(run_dir, "samples.txt")).read()
    assert listed("best") == ["2.orbax-checkpoint-tmp"] and not os.path.exists(os.path.join(run_dir, "eval_2.json"))

    killed(command, env, "checkpoints:4", tmp_path)  # evaluated update 2 again, saved best/, went on
    assert logged() == [(1, True), (2, True), (2, False), (3, True), (4, True)]
    assert listed("checkpoints") == ["2", "4.orbax-checkpoint-tmp"] and listed("best") == ["2"]

    # The last rerun here, in this process (its programs are compiled): the same experiment.
    resumed = train.run(load_experiment("gsm8k_llama", command[2:]), tokenizer=tokenizer, progress=False)
    assert_ends_as(run_dir, straight, resumed["params"])
