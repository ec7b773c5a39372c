"""The example command lines fail fast on careless input, in one line.

Each bad input ends its command with exit status 2 and exactly one line on
stderr, ``PROG: error: ...``, naming the input (no traceback), before any
training, leaving nothing behind. One test per command runs it as a
subprocess (interpreter start to exit status; with the training quick mode
off); the other inputs go through the same ``main`` in-process, where the
only difference is the interpreter start. Also here: the shared argument
types and the help texts.
"""

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from madam_examples import cli
from madam_examples import data
from madam_examples import demo
from madam_examples import equinox_mlp
from madam_examples import lns_digits
from madam_examples import sharded_train
from madam_examples import tasks

TIMEOUT = 120  # seconds; the commands fail in a few (importing JAX)
DEMO = demo.PROG


def run_command(module, *args):
  """``python -m madam_examples.<module> ARGS``, quick mode off."""
  env = {k: v for k, v in os.environ.items() if k != cli.QUICK_ENV}
  return subprocess.run(
    [sys.executable, "-m", f"madam_examples.{module}", *map(str, args)],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=env,
    check=False,
  )


def error_line(code, stderr, prog):
  """The one stderr line of a failed command (status 2), without its prefix."""
  assert code == 2, stderr
  lines = stderr.splitlines()
  assert len(lines) == 1, stderr  # one line: no traceback, no usage
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  return lines[0].removeprefix(f"{prog}: error: ")


def fails_in_process(main, argv, capsys, prog):
  """``main(argv)`` in-process: its error line. Nothing was printed but the
  demo's first line: no task was built, no training started."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  out, err = capsys.readouterr()
  assert all(
    line.startswith(f"{DEMO}: building task") for line in out.splitlines()
  ), out
  return error_line(exit_info.value.code, err, prog)


# ----------------------------------------------- madam-demo --out and --data


def test_demo_out_is_an_existing_file(tmp_path):
  """Checked before training: the file is left as it was."""
  out = tmp_path / "results.txt"
  out.write_text("keep me")
  proc = run_command("demo", "--out", out)
  line = error_line(proc.returncode, proc.stderr, DEMO)
  assert line == (
    f"argument --out: {str(out)!r} exists and is not a folder; "
    "name a folder for the outputs (made if missing)"
  )
  assert proc.stdout == ""
  assert out.read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["results.txt"]


def test_demo_out_cannot_be_made(tmp_path, capsys):
  """A folder under a file cannot be made: nothing is written anywhere."""
  (tmp_path / "file").write_text("")
  out = tmp_path / "file" / "results"
  line = fails_in_process(demo.main, ["--out", str(out)], capsys, DEMO)
  assert line == (
    f"argument --out: cannot make folder {str(out)!r}: "
    f"{str(tmp_path / 'file')!r} is not a folder"
  )
  assert sorted(os.listdir(tmp_path)) == ["file"]


def test_output_dir_is_proven_by_creating_a_file_and_leaves_nothing(tmp_path):
  """``os.access`` says yes to root even where nothing can be created: the
  check creates a probe file instead, and removes what it made."""
  (tmp_path / "keep").mkdir()
  (tmp_path / "keep" / "old.txt").write_text("old")
  assert cli.output_dir(str(tmp_path / "keep")) == str(tmp_path / "keep")
  assert cli.output_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
  assert sorted(os.listdir(tmp_path)) == ["keep"]  # checked, not left made
  assert os.listdir(tmp_path / "keep") == ["old.txt"]
  assert (tmp_path / "keep" / "old.txt").read_text() == "old"
  if os.path.isdir("/proc/self"):
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write into"):
      cli.output_dir("/proc/x")


def test_output_file_is_proven_by_opening_it_and_leaves_it_as_it_was(tmp_path):
  (tmp_path / "old.json").write_text("{}")
  assert cli.output_file(str(tmp_path / "old.json"))
  assert (tmp_path / "old.json").read_text() == "{}"
  assert cli.output_file(str(tmp_path / "new" / "m.json"))
  assert sorted(os.listdir(tmp_path)) == ["old.json"]
  with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
    cli.output_file(str(tmp_path))
  with pytest.raises(argparse.ArgumentTypeError, match="is not a folder"):
    cli.output_file(str(tmp_path / "old.json" / "x.json"))
  if os.path.isdir("/proc/self"):
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
      cli.output_file("/proc/x.json")


@pytest.mark.parametrize(
  "task, expected",
  [
    ("mlp", "pass the cifar-10-batches-py folder"),
    ("transformer", "expected a text file or a folder of .txt files"),
  ],
)
def test_demo_data_path_does_not_exist(task, expected, tmp_path, capsys):
  missing = tmp_path / "missing"
  line = fails_in_process(
    demo.main,
    ["--task", task, "--data", str(missing), "--out", str(tmp_path / "out")],
    capsys,
    DEMO,
  )
  assert line.startswith(f"{str(missing)!r} does not exist; ")
  assert expected in line
  assert not (tmp_path / "out").exists()


def test_demo_data_is_junk_named_like_cifar_batches(tmp_path, capsys):
  rng = np.random.default_rng(0)
  for name in ("data_batch_1", "test_batch"):
    (tmp_path / name).write_bytes(rng.bytes(4096))
  line = fails_in_process(
    demo.main,
    ["--data", str(tmp_path), "--out", str(tmp_path / "out")],
    capsys,
    DEMO,
  )
  assert line.startswith(
    f"{tmp_path / 'data_batch_1'} is not a CIFAR-10 "
    "python batch (it does not unpickle: "
  )
  assert line.endswith(
    "pass the cifar-10-batches-py folder of the 'CIFAR-10 "
    "python version' (data_batch_1 ... data_batch_5 and "
    "test_batch)."
  )


def test_cifar_batch_that_unpickles_to_something_else(tmp_path):
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump([1, 2, 3], f)
  (tmp_path / "test_batch").write_bytes(b"")
  with pytest.raises(cli.InputError, match="holds a list, not a dict"):
    data.load_cifar10(tmp_path)


def test_demo_text_folder_without_text(tmp_path, capsys):
  (tmp_path / "notes.md").write_text("not a .txt file " * 20)
  line = fails_in_process(
    demo.main, ["--task", "transformer", "--data", str(tmp_path)], capsys, DEMO
  )
  assert line == (
    f"folder {str(tmp_path)!r} holds no .txt files; put UTF-8 "
    "text in files ending in .txt there (other files are "
    "ignored), or give one text file."
  )


def test_demo_refuses_random_bytes_as_text(tmp_path, capsys):
  """Random bytes are mostly outside the vocabulary: refused, with the
  counts and the flag that overrides it; the flag trains on them and the
  task's description (printed before training) reports the counts."""
  path = tmp_path / "noise.txt"
  path.write_bytes(np.random.default_rng(0).bytes(20_000))
  line = fails_in_process(
    demo.main, ["--task", "transformer", "--data", str(path)], capsys, DEMO
  )
  text = path.read_text(encoding="utf-8", errors="replace")
  unknown = data.unknown_count(text)
  assert unknown > 0.5 * len(text)
  assert line.startswith(
    f"{unknown:,} of the {len(text):,} characters read "
    f"from {path} ({unknown / len(text):.0%}) are outside "
    "the model's vocabulary"
  )
  assert "At most 5% is accepted" in line
  assert "(--max-unknown-fraction) to train on it anyway." in line
  task = tasks.build_task(
    "transformer", data_path=str(path), quick=True, max_unknown_fraction=1.0
  )
  assert task.description.endswith(
    f"on {path} ({len(text):,} characters, {unknown / len(text):.1%} "
    "unknown, read as '?')"
  )


def test_text_with_a_few_unknown_characters_is_accepted(tmp_path):
  path = tmp_path / "t.txt"
  line = "A caf\u00e9 au lait, s'il vous pla\u00eet, with a croissant. "
  path.write_text(line * 20, encoding="utf-8")  # 2 of 51: 3.9 % unknown
  text = data.load_text_files(path)
  assert text.unknown == 40 and text.num_chars == 20 * len(line)


# -------------------------------------------------- flag values, every CLI


def test_lns_digits_zero_steps():
  proc = run_command("lns_digits", "--steps", "0")
  assert error_line(proc.returncode, proc.stderr, lns_digits.PROG) == (
    "argument --steps: must be at least 1, got 0"
  )
  assert proc.stdout == ""


def test_equinox_mlp_zero_steps():
  proc = run_command("equinox_mlp", "--steps", "0")
  assert error_line(proc.returncode, proc.stderr, equinox_mlp.PROG) == (
    "argument --steps: must be at least 1, got 0"
  )
  assert proc.stdout == ""


@pytest.mark.parametrize(
  "main, prog, argv, message",
  [
    (
      demo.main,
      DEMO,
      ["--steps", "0"],
      "argument --steps: must be at least 1, got 0",
    ),
    (
      demo.main,
      DEMO,
      ["--lr", "-1"],
      "argument --lr: must be positive, got -1",
    ),
    (
      demo.main,
      DEMO,
      ["--optimizer", "lion"],
      "argument --optimizer: unknown optimizer 'lion'; choose from madam, "
      "adam, sgd",
    ),
    (
      demo.main,
      DEMO,
      ["--max-unknown-fraction", "2"],
      "argument --max-unknown-fraction: must be between 0 and 1, got 2",
    ),
    (
      lns_digits.main,
      lns_digits.PROG,
      ["--steps", "-3"],
      "argument --steps: must be at least 1, got -3",
    ),
    (
      lns_digits.main,
      lns_digits.PROG,
      ["--levels", "40000"],
      "argument --levels: LNSFormat.levels=40000 is out of range: codes are "
      "int8 for up to 127 levels and int16 for up to 32767; choose 2 <= "
      "levels <= 32767",
    ),
    (
      lns_digits.main,
      lns_digits.PROG,
      ["--seed", "-1"],
      "argument --seed: must be 0 or more, got -1",
    ),
    (
      sharded_train.main,
      sharded_train.PROG,
      ["--steps", "0"],
      "argument --steps: must be at least 1, got 0",
    ),
    (
      sharded_train.main,
      sharded_train.PROG,
      ["--learning-rate", "nan"],
      "argument --learning-rate: must be positive, got nan",
    ),
    (
      sharded_train.main,
      sharded_train.PROG,
      ["--simulate-devices", "x"],
      "argument --simulate-devices: expected a whole number, got 'x'",
    ),
    (
      equinox_mlp.main,
      equinox_mlp.PROG,
      ["--batch-size", "0"],
      "argument --batch-size: must be at least 1, got 0",
    ),
  ],
)
def test_bad_flag_values(main, prog, argv, message, capsys):
  assert fails_in_process(main, argv, capsys, prog) == message


# --------------------------------------------------------- sharded_train


def test_sharded_train_bad_mesh_with_simulated_devices():
  """The fix offered is the flag's value, not the flag that was passed."""
  proc = run_command(
    "sharded_train", "--simulate-devices", "4", "--mesh", "data=2,fsdp=4"
  )
  assert error_line(proc.returncode, proc.stderr, sharded_train.PROG) == (
    "--mesh 'data=2,fsdp=4' has 8 devices but JAX sees 4; make the sizes "
    "multiply to 4 (or use -1 for one axis), or change --simulate-devices 4."
  )


def test_sharded_train_bad_mesh_without_simulated_devices(eight_devices):
  args = sharded_train.parse_args(["--mesh", "data=3"])
  with pytest.raises(cli.InputError) as error:
    sharded_train.check_mesh(args)
  assert str(error.value) == (
    "--mesh 'data=3' has 3 devices but JAX sees 8; make the sizes multiply "
    "to 8 (or use -1 for one axis), or pass --simulate-devices N on a CPU "
    "host."
  )


def test_sharded_train_batch_must_split_over_the_devices(eight_devices):
  config = sharded_train.Config(
    mesh="data=2,fsdp=4", batch_size=12, dim=32, heads=2
  )
  mesh = sharded_train.mesh_lib.make_mesh(config.mesh, eight_devices)
  with pytest.raises(
    cli.InputError,
    match="--batch-size 12 must be a multiple of the 8 devices of the mesh",
  ):
    sharded_train.check_config(config, mesh)


# ------------------------------------------------------ help and --quick


def help_text(parse_args, capsys):
  with pytest.raises(SystemExit) as exit_info:
    parse_args(["--help"])
  assert exit_info.value.code == 0
  return capsys.readouterr().out


@pytest.mark.parametrize(
  "module", [demo, lns_digits, sharded_train, equinox_mlp]
)
def test_help_states_each_default_once(module, capsys):
  text = " ".join(help_text(module.parse_args, capsys).split())
  assert "(default: None)" not in text
  for option in text.split(" --")[1:]:
    assert option.count("(default") <= 1, option
  if module is not sharded_train:
    assert cli.QUICK_HELP in text  # --quick: the same everywhere


def test_demo_help_states_each_tasks_steps(capsys):
  text = " ".join(help_text(demo.parse_args, capsys).split())
  for name, steps in tasks.DEFAULT_STEPS.items():
    assert f"{name}: " in text and f", {steps} steps" in text
  assert "madam 0.01, adam 0.001, sgd 0.1" in text


def test_lns_digits_documents_every_flag():
  actions = lns_digits.build_parser()._actions  # pylint: disable=protected-access
  flags = {a.option_strings[-1]: a.help for a in actions}
  assert set(flags) == {
    "--help",
    "--model",
    "--steps",
    "--levels",
    "--seed",
    "--quick",
  }
  for flag, text in flags.items():
    assert text and len(text.split()) >= 4, flag


@pytest.mark.parametrize(
  "argv, env, expected",
  [
    ([], None, "default"),
    (["--quick"], None, cli.QUICK_STEPS),
    ([], "1", cli.QUICK_STEPS),
    (["--quick", "--steps", "7"], None, 7),
  ],
)
def test_quick_is_twenty_steps_unless_steps_is_given(
  argv, env, expected, monkeypatch
):
  """The same in every command that has --quick (the demo: the task's
  default steps, or ``cli.QUICK_STEPS`` for a quick task)."""
  if env is None:
    monkeypatch.delenv(cli.QUICK_ENV, raising=False)
  else:
    monkeypatch.setenv(cli.QUICK_ENV, env)
  args = demo.parse_args(argv)
  task = tasks.build_task("mlp", quick=args.quick)
  for steps, default in [
    (lns_digits.parse_args(argv).steps, lns_digits.DEFAULT_STEPS),
    (equinox_mlp.parse_args(argv).steps, equinox_mlp.DEFAULT_STEPS),
    (args.steps or task.steps, tasks.DEFAULT_STEPS["mlp"]),
  ]:
    assert steps == (default if expected == "default" else expected)
