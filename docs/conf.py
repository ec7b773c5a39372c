"""Sphinx configuration of the madam-optax documentation.

Build from the repository root with ``sphinx-build -W docs docs/_build``.

The API reference is generated from the docstrings (autosummary writes one
page per public name into ``_autosummary/`` at build time), and
``ext/coverage_check.py`` fails the build when a name of
``madam_optax.__all__`` has no page. The notebooks of ``notebooks/`` are copied
into ``notebooks/`` here and executed by myst-nb in their quick mode
(``MADAM_QUICK=1``). Environment switches:

* ``MADAM_DOCS_EXECUTE``: myst-nb's execution mode, ``cache`` by default
  (executed once, re-executed when a notebook's code changes), ``force`` or
  ``off`` (render the notebooks without running them).
* ``MADAM_QUICK``: ``1`` unless set; ``0`` runs the notebooks in full.
"""

import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "ext"))

import madam_optax

# -- Project ------------------------------------------------------------------

project = "madam-optax"
author = "madam-optax developers"
copyright = "madam-optax developers"  # pylint: disable=redefined-builtin
release = madam_optax.__version__
version = release
REPOSITORY = "https://github.com/madam-optax/madam-optax"

# -- Extensions -----------------------------------------------------------------

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "myst_nb",
  "coverage_check",
]

templates_path = ["_templates"]
# jupyter_execute: myst-nb writes executed notebooks beside the output folder.
exclude_patterns = [
  "_build",
  "jupyter_execute",
  "Thumbs.db",
  ".DS_Store",
  "**.ipynb_checkpoints",
]
source_suffix = {
  ".rst": "restructuredtext",
  ".md": "myst-nb",
  ".ipynb": "myst-nb",
}

autosummary_generate = True
# Generated afresh by every build: a stale page of a name that left the tables
# would otherwise still count as its documentation.
shutil.rmtree(DOCS / "_autosummary", ignore_errors=True)
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Google-style "Attributes:" become fields of their class, not separate
# objects (which would duplicate the NamedTuple fields autodoc finds).
napoleon_use_ivar = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- Notebooks: copied from ../notebooks, executed at build time --------------

NOTEBOOKS_SRC = ROOT / "notebooks"
NOTEBOOKS_DST = DOCS / "notebooks"


def _copy_notebooks() -> None:
  """Copies the notebooks (only those that changed, to keep the cache)."""
  NOTEBOOKS_DST.mkdir(exist_ok=True)
  wanted = {p.name for p in NOTEBOOKS_SRC.glob("*.ipynb")}
  for stale in NOTEBOOKS_DST.glob("*.ipynb"):
    if stale.name not in wanted:
      stale.unlink()
  for src in sorted(NOTEBOOKS_SRC.glob("*.ipynb")):
    dst = NOTEBOOKS_DST / src.name
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
      shutil.copyfile(src, dst)


_copy_notebooks()

nb_execution_mode = os.environ.get("MADAM_DOCS_EXECUTE", "cache")
nb_execution_timeout = 900  # seconds per cell
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True
# The notebooks' own first cell installs the package where it is missing; here
# the kernel imports this checkout (PYTHONPATH) and runs in quick mode.
os.environ.setdefault("MADAM_QUICK", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(
  [str(ROOT)]
  + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

# -- Docstrings of module-level constants ---------------------------------------


# What each public constant is (a constant has no docstring of its own; autodoc
# would show its type's).
CONSTANTS = {
  "madam_optax.REFERENCE_FORMAT": "The paper's integer LNS format: natural-log base ``e**0.001`` and "
  "4096 levels (int16 codes), used by "
  ":func:`~madam_optax.lns_madam_reference`.",
}


def _describe_constant(app, what, name, obj, options, lines):
  """Replaces a constant's inherited type docstring by what it is."""
  del app, options
  if what == "data" and getattr(type(obj), "__doc__", None) == obj.__doc__:
    lines[:] = [
      CONSTANTS.get(
        name, f"A constant :class:`~madam_optax.{type(obj).__name__}`."
      ),
      "",
    ]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are described in their class's Attributes section."""
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  if doc.startswith("Alias for field number"):
    return True
  return skip


def _cache_in_output_folder(app, config):
  """Keeps myst-nb's execution cache inside the build's output folder."""
  config.nb_execution_cache_path = str(
    pathlib.Path(app.outdir) / ".jupyter_cache"
  )


def setup(app):
  app.connect("config-inited", _cache_in_output_folder, priority=100)
  app.connect("autodoc-process-docstring", _describe_constant)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)


# -- HTML -----------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "madam-optax"
html_theme_options = {
  "repository_url": REPOSITORY,
  "use_repository_button": True,
  "path_to_docs": "docs",
  "show_toc_level": 2,
}
