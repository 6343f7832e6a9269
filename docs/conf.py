"""Sphinx configuration of the worldplay site.

Build it with ``nox -s docs``, which renders ``docs/generated/`` from the committed results
(``python -m worldplay.site render``) and then runs
``sphinx-build -W --keep-going -n -b html docs docs/_build/html``: every warning (including
unresolved cross-references, ``-n``) fails the build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package, also without an installed copy

if not (DOCS / "generated" / "fragments").is_dir():
    raise RuntimeError(
        f"{DOCS / 'generated'} is missing: render it first with `python -m worldplay.site render` "
        "(`nox -s docs` does both)"
    )

project = "worldplay"
author = "worldplay contributors"
copyright = "worldplay contributors; HY-WorldPlay and Wan 2.2 by their authors"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx_design",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "generated/fragments", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3

# API reference
autosummary_generate = False  # the tables link to the automodule sections written by hand
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "separated"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -n: every cross-reference must resolve. Without network there is no intersphinx, so the types
# of third-party and standard-library modules are ignored by name, explicitly and only those.
nitpicky = True
_EXTERNAL = (
    r"torch(\..*)?", r"numpy(\..*)?", r"np\..*", r"scipy\..*", r"pathlib\..*", r"Path", r"os\..*",
    r"collections\.abc\..*", r"typing\..*", r"dataclasses\..*", r"enum\..*", r"argparse\..*",
    r"contextlib\..*", r"concurrent\..*", r"safetensors\..*", r"huggingface_hub\..*", r"PIL\..*",
    r"imageio\..*", r"tqdm\..*", r"Tensor", r"ndarray", r"nn\.Module", r"Generator", r"dtype", r"device",
)
nitpick_ignore_regex = [(role, pattern) for role in ("py:class", "py:obj", "py:exc", "py:data", "py:func",
                                                      "py:meth", "py:mod", "py:attr")
                        for pattern in _EXTERNAL]

html_theme = "pydata_sphinx_theme"
html_title = "worldplay"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_favicon = "_static/favicon.svg"  # also keeps browsers from asking for a missing /favicon.ico
html_last_updated_fmt = None  # no timestamps in the pages
html_show_sourcelink = False
html_copy_source = False
# Pages without sub-pages get no (empty) left sidebar.
html_sidebars = {"index": [], "model_card": [], "gallery": []}
html_theme_options = {
    "navbar_end": ["theme-switcher"],
    "footer_start": ["copyright"],
    "footer_end": [],
    "secondary_sidebar_items": ["page-toc"],
    "show_prev_next": False,
    "navigation_with_keys": False,
}
html_context = {"default_mode": "light"}

# Reproducible output: no build dates anywhere.
os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
