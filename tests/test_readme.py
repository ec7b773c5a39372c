"""Every code block of the README runs as written; its links and URLs hold.

The Python blocks run in a fresh namespace each, with nothing predefined; the
sharding block runs the way the README says to run it on one CPU, as a script
under ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The install
commands need a network and the quick-start commands build a virtual
environment: CI runs the test command (``.ci/run``), and the tests check the
lines themselves.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()
REPOSITORY = "https://github.com/madam-optax/madam-optax"
TEST_COMMAND = (
  'python3 -m venv .venv && .venv/bin/pip install ".[test]" && '
  ".venv/bin/python -m pytest"
)


def code_blocks(language: str) -> list[str]:
  return re.findall(
    rf"^```{language}\n(.*?)^```", README, re.DOTALL | re.MULTILINE
  )


def python_block_params() -> list:
  return [
    pytest.param(code, id=f"block{i}")
    for i, code in enumerate(code_blocks("python"))
  ]


def test_readme_has_the_expected_python_blocks():
  blocks = code_blocks("python")
  assert len(blocks) == 4, "usage, zero leaves, LNS, sharding"
  assert sum("make_mesh" in code for code in blocks) == 1


def simulated_devices_command() -> list[str]:
  """The README's own command line for the sharding snippet on one CPU."""
  match = re.search(r"`(XLA_FLAGS=\S+) python snippet\.py`", README)
  assert match, "README: no `XLA_FLAGS=... python snippet.py` line"
  return match.group(1).split("=", 1)


@pytest.mark.parametrize("code", python_block_params())
def test_readme_python_block_runs_as_written(code, tmp_path):
  if "make_mesh" not in code:
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102  pylint: disable=exec-used
    return
  name, value = simulated_devices_command()
  assert value == "--xla_force_host_platform_device_count=8"
  script = tmp_path / "snippet.py"
  script.write_text(
    code + "\nprint(jax.device_count(), params['w'].sharding == sharding)\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env[name] = value
  proc = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=env,
    cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["8", "True"]


def test_test_command_block_is_what_ci_reads():
  lines = README.splitlines()
  at = lines.index("<!-- test-command -->")
  assert lines[at + 1 : at + 4] == ["```bash", TEST_COMMAND, "```"]


def test_quick_start_commands_name_real_entry_points():
  bash = "\n".join(code_blocks("bash"))
  assert (
    'python3 -m venv .venv && .venv/bin/pip install ".[examples]" && '
    ".venv/bin/madam-demo"
  ) in bash
  assert 'madam-demo = "madam_examples.demo:main"' in PYPROJECT
  for extra in ("examples", "docs", "test"):
    assert re.search(rf"^{extra} = \[$", PYPROJECT, re.MULTILINE), extra


def test_install_lines_use_the_repository_url():
  urls = PYPROJECT.split("[project.urls]", 1)[1].split("\n[", 1)[0]
  assert f'Repository = "{REPOSITORY}"' in urls
  assert f'Homepage = "{REPOSITORY}"' in urls
  installs = [shlex.split(line) for line in code_blocks("bash")[0].splitlines()]
  assert [words[:2] for words in installs] == [["pip", "install"]] * 2
  assert installs[0][2] == f"madam-optax @ git+{REPOSITORY}"
  assert installs[1][2] == f"madam-optax[examples] @ git+{REPOSITORY}"
  assert "`pip install madam-optax`" in README
  assert '"jax[cuda12]"' in README and '"jax[tpu]"' in README


@pytest.mark.parametrize(
  "path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name
)
def test_notebooks_install_from_the_repository_url(path):
  install = "".join(json.loads(path.read_text())["cells"][1]["source"])
  assert f'REPO = "{REPOSITORY}"' in install
  assert '%pip install -q "madam-optax[examples] @ git+{REPO}"' in install


def test_relative_links_point_at_files():
  links = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", README)
  assert "docs/maths.md" in links and "CITATION.cff" in links
  missing = [link for link in links if not (ROOT / link).exists()]
  assert not missing, f"README links to missing files: {missing}"


def test_first_screen_answers_should_i_use_this():
  """What, why, when not, install, the one command, in that order, then the
  learning rate; all before the first code example."""
  first_screen = README.split("## Usage", 1)[0]
  at = [
    first_screen.index(phrase)
    for phrase in (
      "**Madam**, the multiplicative version of Adam",
      "Learning-rate robustness",
      "Think twice",
      "## Install",
      ".venv/bin/madam-demo",
      "## Which learning rate?",
    )
  ]
  assert at == sorted(at)
  for phrase in (
    "One state buffer",
    "int8 training",
    "start at **0.1**",
    "10,000 steps",
    "`p_scale`",
    "docs/_static/demo_sweep.png",
  ):
    assert phrase in first_screen, phrase


def test_readme_is_at_most_250_lines():
  assert len(README.splitlines()) <= 250


def test_citation_file_describes_the_software_and_cites_the_paper():
  import yaml  # pylint: disable=import-outside-toplevel  (docs extra: PyYAML)

  cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
  assert cff["repository-code"] == REPOSITORY
  assert cff["license"] == "Apache-2.0"
  paper = cff["references"][0]
  assert paper["url"] == "https://arxiv.org/abs/2006.14560"
  assert paper["authors"][0]["family-names"] == "Bernstein"
  assert "@inproceedings{bernstein2020madam" in README
