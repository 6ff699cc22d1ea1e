"""The user errors of tools/convert_hf.py, export_hf.py, eval.py and plan.py (`make convert`, `make
export`, `make eval`, `make plan`): one line, exit 2, no traceback, naming the file, option, tensor
or step at fault, said before anything is read, and nothing written. And the permissions of what
convert and export write."""

from __future__ import annotations

import json
import os
import runpy
import stat
import sys

import pytest

from hf_models import make_hf_model
from latro_jax.checkpoint import check_output
from latro_jax.convert.hf import SAFETENSORS_INDEX, convert_hf, export_hf

REPO = os.path.join(os.path.dirname(__file__), "..")


def tool(name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """tools/<name>.py in this process: its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # plan.py may add to it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, "tools", f"{name}.py"), run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


def all_paths(root) -> set[str]:
    return {os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny HF model (one file, and sharded), copies damaged each way, its conversion, a run's
    folders of checkpoint steps (step folders only: every error comes before a step is read), and
    a regular file to put outputs under."""
    root = tmp_path_factory.mktemp("inputs")
    model = make_hf_model("llama")
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    convert_hf(str(root / "hf"), root / "ckpt")

    def copy(source: str, name: str, damage=None, file: str = "model.safetensors"):
        """A copy of the model directory `source` with `damage` done to the bytes of its `file`."""
        os.makedirs(root / name)
        for each in os.listdir(root / source):
            data = (root / source / each).read_bytes()
            (root / name / each).write_bytes(damage(data) if damage and each == file else data)

    copy("hf", "truncated", lambda data: data[: len(data) // 2])
    copy("hf", "garbage", lambda data: data[:8] + b"not json" + data[16:])  # the header's opening bytes
    shards = sorted(n for n in os.listdir(root / "sharded") if n.endswith(".safetensors"))
    copy("sharded", "sharded_truncated", lambda data: data[:-100], file=shards[1])
    index = json.loads((root / "sharded" / SAFETENSORS_INDEX).read_text())
    holder = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(s for s in shards if s != holder)
    copy("sharded", "sharded_misindexed", lambda data: json.dumps(index).encode(), file=SAFETENSORS_INDEX)
    for step in ("best/4", "checkpoints/4", "checkpoints/8"):
        os.makedirs(root / "runs" / "x" / step / "state")
    (root / "a_file").write_text("not a directory\n")
    return root, shards, all_paths(root)


# case: (tool, arguments, what the one line must name); {name} is a path under the inputs, {shard1}
# the second shard's file name. Outputs are relative: under the test's own (empty) directory.
CASES = {
    # damaged safetensors: the file is named
    "convert: truncated model.safetensors": (
        "convert_hf", ["{truncated}", "out"],
        ["{truncated}/model.safetensors: not a readable safetensors file", "incomplete metadata"]),
    "convert: model.safetensors with a garbage header": (
        "convert_hf", ["{garbage}", "out"], ["{garbage}/model.safetensors: not a readable safetensors file"]),
    "convert: a truncated shard": (
        "convert_hf", ["{sharded_truncated}", "out"], ["{sharded_truncated}/{shard1}: not a readable safetensors"]),
    "convert: an index listing a tensor in the wrong shard": (
        "convert_hf", ["{sharded_misindexed}", "out"],
        [f"{{sharded_misindexed}}/{SAFETENSORS_INDEX}: lists tensor 'model.norm.weight' in", "does not hold it"]),
    "eval: truncated model.safetensors": (
        "eval", ["{truncated}", "--task", "arithmetic", "--limit", "2"],
        ["{truncated}/model.safetensors: not a readable safetensors file"]),
    "eval: model.safetensors with a garbage header": (
        "eval", ["{garbage}", "--task", "arithmetic", "--limit", "2"],
        ["{garbage}/model.safetensors: not a readable safetensors file"]),
    # eval's counts, before anything is read (MODEL is not even looked at)
    "eval --maj-k 0": ("eval", ["{nowhere}", "--task", "arithmetic", "--maj-k", "0"], ["--maj-k 0", ">= 1"]),
    "eval --maj-k -2": ("eval", ["{nowhere}", "--task", "arithmetic", "--maj-k", "-2"], ["--maj-k -2", ">= 1"]),
    "eval --max-new-tokens 0": (
        "eval", ["{nowhere}", "--task", "arithmetic", "--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
    "eval --max-new-tokens -1": (
        "eval", ["{nowhere}", "--task", "arithmetic", "--max-new-tokens", "-1"], ["--max-new-tokens -1", ">= 1"]),
    "eval --limit -1": ("eval", ["{nowhere}", "--task", "arithmetic", "--limit", "-1"], ["--limit -1", ">= 0"]),
    "eval --batch-size 0": (
        "eval", ["{nowhere}", "--task", "arithmetic", "--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    # export's shard size, before anything is read
    "export --max-shard-size=abc": (
        "export_hf", ["{ckpt}", "out", "--max-shard-size=abc"], ["--max-shard-size 'abc'", "5GB", "500MB"]),
    "export --max-shard-size=0GB": ("export_hf", ["{ckpt}", "out", "--max-shard-size=0GB"], ["--max-shard-size '0GB'"]),
    # an output that cannot be made, said before anything is read
    "eval --out under a file": (
        "eval", ["{ckpt}", "--task", "arithmetic", "--out", "{a_file}/results.json"],
        ["{a_file}/results.json cannot be created", "{a_file} is a file, not a directory"]),
    "eval --out a directory": (
        "eval", ["{ckpt}", "--task", "arithmetic", "--out", "{runs}"], ["{runs} is a directory"]),
    "convert into a path under a file": (
        "convert_hf", ["{hf}", "{a_file}/ckpt"], ["{a_file}/ckpt cannot be created", "{a_file} is a file"]),
    "convert onto an existing output": ("convert_hf", ["{hf}", "{ckpt}"], ["{ckpt} already exists"]),
    "export into a path under a file": (
        "export_hf", ["{ckpt}", "{a_file}/out/hf"], ["{a_file}/out/hf cannot be created", "{a_file} is a file"]),
    "export of a run step into a path under a file": (
        "export_hf", ["{runs}/x/best/4", "{a_file}/hf"], ["{a_file}/hf cannot be created"]),
    "plan --json under a file": (
        "plan", ["gsm8k_llama", "--json", "{a_file}/plan.json"], ["{a_file}/plan.json cannot be created"]),
    # a run's folders of steps, or a step that is not there; a path that is not a model
    "export of a missing step": (
        "export_hf", ["{runs}/x/checkpoints/7", "out"],
        ["{runs}/x/checkpoints/7: no such checkpoint step", "{runs}/x/checkpoints holds steps 4, 8"]),
    "export of a run's best/": (
        "export_hf", ["{runs}/x/best", "out"],
        ["{runs}/x/best holds checkpoint steps (4): give one, e.g. {runs}/x/best/4"]),
    "export of a missing checkpoint": ("export_hf", ["{nowhere}", "out"], ["{nowhere}: no such directory"]),
    "export of an HF directory": ("export_hf", ["{hf}", "out"], ["{hf} is not a latro-jax model checkpoint",
                                                                  "make convert"]),
    "eval of a run's best/": (
        "eval", ["{runs}/x/best"], ["{runs}/x/best holds checkpoint steps (4): give one, e.g. {runs}/x/best/4"]),
    "eval of a run's directory": (
        "eval", ["{runs}/x", "--task", "arithmetic"],
        ["{runs}/x holds checkpoint steps (best/4, checkpoints/4, checkpoints/8)", "e.g. {runs}/x/checkpoints/8"]),
    "eval of a missing step": (
        "eval", ["{runs}/x/checkpoints/7"], ["{runs}/x/checkpoints/7: no such checkpoint step", "holds steps 4, 8"]),
    # plan's inputs
    "plan: a missing --model-config": (
        "plan", ["gsm8k_llama", "--model-config", "{nowhere}/config.json"], ["{nowhere}/config.json: no such config"]),
    "plan --mesh 1,x,1": ("plan", ["gsm8k_llama", "--mesh", "1,x,1"], ["--mesh '1,x,1'", "data,fsdp,tensor"]),
    "plan --mesh 0,8,1": ("plan", ["gsm8k_llama", "--mesh", "0,8,1"], ["--mesh '0,8,1'", "e.g. 1,8,1"]),
    "plan --mesh 8": ("plan", ["gsm8k_llama", "--mesh", "8"], ["--mesh '8'"]),
    "plan --lora x": ("plan", ["gsm8k_llama", "--lora", "x"], ["model.lora_rank='x'"]),
    "plan --lora -1": ("plan", ["gsm8k_llama", "--lora", "-1"], ["model.lora_rank=-1", ">= 0"]),
    "plan --device-memory 80XB": (
        "plan", ["gsm8k_llama", "--device-memory", "80XB"], ["--device-memory '80XB'", "80GB or 80GiB"]),
    "plan: a model with no shape": (
        "plan", ["gsm8k_llama", "model.hf=someone/unknown"], ["no model shape", "model.hf='someone/unknown'",
                                                             "--model-config"]),
    "plan --prompt-len 0": ("plan", ["gsm8k_llama", "--prompt-len", "0"], ["--prompt-len 0", ">= 1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_exit_2_and_nothing_is_written(case, inputs, tmp_path, monkeypatch, capsys):
    root, shards, before = inputs
    name, argv, named = CASES[case]
    paths = {p: str(root / p) for p in os.listdir(root)} | {"nowhere": str(root / "nowhere"), "shard1": shards[1]}
    monkeypatch.chdir(tmp_path)  # relative outputs, and eval's default results.json, land here
    code, err = tool(name, [a.format(**paths) for a in argv], monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in named:
        assert part.format(**paths) in err, (part.format(**paths), err)
    assert os.listdir(tmp_path) == [] and all_paths(root) == before, "something was written"


def test_check_output_says_why_a_path_cannot_be_written(tmp_path, monkeypatch):
    """A folder this process may not write in (read-only, or another user's: tests running as root
    write anywhere, so os.access is stood in for) is named before any work."""
    (tmp_path / "f").write_text("")
    check_output(tmp_path / "new" / "deeper" / "out")  # missing folders are made when written
    check_output(tmp_path / "f", overwrite=True)  # a file may be replaced where asked
    with pytest.raises(FileExistsError, match="f already exists"):
        check_output(tmp_path / "f")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and os.fspath(path) != str(tmp_path))
    with pytest.raises(PermissionError, match=rf"^{tmp_path}/new/out cannot be created: {tmp_path} is not writable"):
        check_output(tmp_path / "new" / "out")


def test_convert_and_export_write_what_the_umask_allows(inputs, tmp_path):
    """Every file convert and export write (the exported safetensors included, which safetensors
    itself makes private: 0600) gets the umask's permissions, as open() gives: under umask 022,
    files 0644 and directories 0755, so that a server running as another user reads them."""
    root, _, _ = inputs
    umask = os.umask(0o022)
    try:
        convert_hf(str(root / "hf"), tmp_path / "ckpt")
        export_hf(tmp_path / "ckpt", tmp_path / "out")
        export_hf(tmp_path / "ckpt", tmp_path / "sharded", max_shard_size="50KB")
    finally:
        os.umask(umask)
    written = all_paths(tmp_path)
    assert any(p.endswith("model.safetensors") for p in written)
    assert any(p.endswith(SAFETENSORS_INDEX) for p in written)
    for path in written:
        expected = 0o755 if os.path.isdir(path) else 0o644
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, (path, oct(os.stat(path).st_mode))
    for made in ("ckpt", "out", "sharded"):
        assert stat.S_IMODE(os.stat(tmp_path / made).st_mode) == 0o755
