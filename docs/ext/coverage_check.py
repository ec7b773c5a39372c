"""Fails the docs build when a public name of ``madam_optax`` has no API page.

The public names are ``madam_optax.__all__``. A name counts as documented
when the Python domain holds ``madam_optax.<name>`` and its description lives
on a page of its own under the autosummary folder (``_autosummary/``), which
the ``.. autosummary::`` tables of ``api.rst`` generate. The check runs once
all sources are read (Sphinx's ``env-check-consistency`` event), so a missing
page stops the build with one error that lists every undocumented name.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import SphinxError
from sphinx.util import logging

logger = logging.getLogger(__name__)

MODULE = "madam_optax"
PAGE_FOLDER = "_autosummary/"


class CoverageError(SphinxError):
  category = "API coverage check failed"


def public_names(module: str = MODULE) -> list[str]:
  """``module.__all__``, the names that must each have a page."""
  import importlib  # pylint: disable=import-outside-toplevel

  return list(importlib.import_module(module).__all__)


def undocumented(
  names: Iterable[str],
  py_objects: Mapping[str, Any],
  module: str = MODULE,
  page_folder: str = PAGE_FOLDER,
) -> list[str]:
  """The names in ``names`` without a page of their own.

  Args:
    names: public names, e.g. ``madam_optax.__all__``.
    py_objects: the Python domain's objects, ``{"madam_optax.madam": entry}``
      where ``entry.docname`` (or ``entry[0]``) is the page that describes it.
    module: the module the names belong to.
    page_folder: the folder, relative to the source directory, of the
      generated one-name pages.

  Returns:
    The undocumented names, sorted.
  """
  missing = []
  for name in names:
    entry = py_objects.get(f"{module}.{name}")
    docname = None if entry is None else getattr(entry, "docname", None)
    if entry is not None and docname is None:
      docname = entry[0]
    if docname is None or not docname.startswith(page_folder):
      missing.append(name)
  return sorted(missing)


def check_coverage(app: Sphinx, env: Any) -> None:
  """``env-check-consistency`` handler: raises unless every name has a page."""
  del app
  missing = undocumented(public_names(), env.get_domain("py").objects)
  if missing:
    message = (
      f"{len(missing)} public name(s) of {MODULE}.__all__ have no API page: "
      f"{', '.join(missing)}. Add each to an autosummary table (with "
      f":toctree: {PAGE_FOLDER.rstrip('/')}) in docs/api.rst."
    )
    logger.error(message)  # the readable line; the error stops the build
    raise CoverageError(message)


def setup(app: Sphinx) -> dict[str, Any]:
  app.connect("env-check-consistency", check_coverage)
  return {
    "version": "1",
    "parallel_read_safe": True,
    "parallel_write_safe": True,
  }
