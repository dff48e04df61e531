"""MkDocs hooks of the documentation site: the generated pages, the install name, result tables, and the
pages other parts of the project own.

- ``on_files`` adds the pages ``scripts/gen_docs.py`` generates (reference, benchmark results) as virtual
  files: nothing generated is written into ``docs/``.
- ``on_page_markdown`` replaces ``{{ dist }}`` with the distribution name from ``pyproject.toml`` (every
  install hint of the site goes through it) and ``<!-- gen:NAME FILE -->`` with a table generated from
  ``benchmarks/results/FILE`` (``gen_docs.MACROS``).
- ``on_config`` leaves out of the nav the pages listed in ``OPTIONAL_PAGES`` while their file does not
  exist, and says so; every other nav entry must exist (``--strict``).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gen_docs  # noqa: E402

log = logging.getLogger("mkdocs.hooks.medpipe")
# Pages written by other parts of the project; the nav lists them and shows each once its file exists.
OPTIONAL_PAGES = {"architecture.md", "security.md", "federated-security.md"}
MACRO = re.compile(r"<!--\s*gen:([a-z-]+)\s+(\S+)\s*-->")


def _prune(nav, docs: Path):
    out = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _prune(value, docs)
                if value:
                    out.append({title: value})
            elif isinstance(value, str) and value in OPTIONAL_PAGES and not (docs / value).is_file():
                log.info("nav: %s is not written yet; left out until it exists", value)
            else:
                out.append(item)
        else:
            out.append(item)
    return out


def on_startup(command, dirty):
    # griffe's notes on docstring style are advice, not broken pages: they do not fail --strict
    logging.getLogger("griffe").setLevel(logging.ERROR)


def on_config(config):
    config["nav"] = _prune(config["nav"], Path(config["docs_dir"]))
    config.setdefault("extra", {})["dist"] = gen_docs.distribution_name()
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for rel, text in gen_docs.pages().items():
        files.append(File.generated(config, rel, content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = markdown.replace("{{ dist }}", config["extra"]["dist"])
    return MACRO.sub(lambda m: gen_docs.MACROS[m.group(1)](m.group(2)), markdown)
