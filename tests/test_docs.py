"""The documentation builds warnings-as-errors, covers the API, and its code runs.

``test_docs_build_with_warnings_as_errors`` runs ``sphinx-build -W`` into a
temporary folder. The notebooks are rendered but not executed there
(``MADAM_DOCS_EXECUTE=off``): ``tests/test_notebooks.py`` already executes
every notebook, and executing them again inside the build takes minutes on a
2-core CPU. Set ``MADAM_DOCS_EXECUTE=force`` to run the build exactly as the
published documentation is built, with the notebooks executed.
"""

import collections
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "ext"))

import coverage_check

import madam_optax

Entry = collections.namedtuple("Entry", "docname node_id objtype aliased")


def _page(name):
  return Entry(f"_autosummary/madam_optax.{name}", "", "function", False)


def test_docs_build_with_warnings_as_errors(tmp_path):
  env = dict(os.environ)
  env.setdefault("MADAM_DOCS_EXECUTE", "off")
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  out = tmp_path / "html"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-E",
      "-q",
      "-b",
      "html",
      str(DOCS),
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=1500,
    check=False,
    env=env,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  for name in madam_optax.__all__:
    page = out / "_autosummary" / f"madam_optax.{name}.html"
    assert page.exists(), f"no API page for madam_optax.{name}"
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    assert (out / "notebooks" / f"{notebook.stem}.html").exists()
  studies = (out / "studies.html").read_text()
  assert "lr_sweep.png" in studies and (out / "_images/lr_sweep.png").exists()


def test_coverage_check_finds_a_name_without_a_page():
  objects = {
    "madam_optax.madam": _page("madam"),
    # Described, but on a hand-written page, not a page of its own.
    "madam_optax.lns_madam": Entry("lns", "", "function", False),
  }
  assert coverage_check.undocumented(
    ["madam", "lns_madam", "log_quantise"], objects
  ) == ["lns_madam", "log_quantise"]
  assert coverage_check.undocumented(["madam"], objects) == []


def test_coverage_check_fails_the_build_naming_the_missing_name():
  names = coverage_check.public_names()
  assert names == list(madam_optax.__all__)
  objects = {f"madam_optax.{n}": _page(n) for n in names}
  domain = type("Domain", (), {"objects": objects})
  env = type("Env", (), {"get_domain": staticmethod(lambda name: domain)})
  coverage_check.check_coverage(None, env)  # all documented: passes
  del objects["madam_optax.with_additive_fallback"]
  with pytest.raises(
    coverage_check.CoverageError,
    match=r"1 public name\(s\).*: with_additive_fallback\.",
  ):
    coverage_check.check_coverage(None, env)


def test_api_page_lists_every_public_name_once():
  listed = re.findall(
    r"^   (\w+)$", (DOCS / "api.rst").read_text(), re.MULTILINE
  )
  assert sorted(listed) == sorted(madam_optax.__all__)
  assert len(listed) == len(set(listed))


def python_blocks() -> list:
  params = []
  for page in sorted(DOCS.glob("*.md")):
    blocks = re.findall(
      r"^```python\n(.*?)^```", page.read_text(), re.DOTALL | re.MULTILINE
    )
    for i, code in enumerate(blocks):
      params.append(pytest.param(code, id=f"{page.name}[{i}]"))
  return params


@pytest.mark.parametrize("code", python_blocks())
def test_docs_python_block_runs_as_written(
  code, tmp_path, monkeypatch, eight_devices
):
  """Each page's snippets are complete programs (8 devices: conftest.py)."""
  del eight_devices
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "docs", "exec"), {})  # noqa: S102  pylint: disable=exec-used
