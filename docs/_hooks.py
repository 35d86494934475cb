"""MkDocs hooks: the figure pages are rendered from the results files at build time.

A page holds a marker, ``<!-- figures: NAME -->``, replaced here by Markdown made from
the files the measurements wrote, so that the site never shows a copied table:

- ``benchmarks``: ``benchmarks/results.json`` (``make bench``), through the same
  ``benchmarks.report.render_markdown`` that writes ``benchmarks/results.md``, without
  its latency section;
- ``latency``: that latency section alone;
- ``soak``: ``benchmarks/soak/async.txt``, the report ``make soak
  SOAK_REPORT=benchmarks/soak/async.txt`` writes (tests/test_soak.py), summed up in a
  table and then shown whole.

The chart ``benchmarks/results.png`` is added to the site as ``figures/results.png``.
A marker with no renderer, or a results file that is missing, fails the build.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
SOAK = ROOT / "benchmarks" / "soak" / "async.txt"
CHART = ROOT / "benchmarks" / "results.png"
MARKER = re.compile(r"<!-- figures: (?P<name>[\w-]+) -->")
LATENCY_HEADING = "### Latency"


def _benchmark_markdown() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the benchmarks package, from the repository
    from benchmarks.report import render_markdown

    return str(render_markdown(json.loads(RESULTS.read_text())))


def _sections(markdown: str) -> tuple[str, str]:
    """The benchmark tables without the latency section, and that section alone."""
    start = markdown.index(LATENCY_HEADING)
    end = markdown.find("\n#", start + len(LATENCY_HEADING))
    end = len(markdown) if end == -1 else end
    return markdown[:start] + markdown[end:], markdown[start:end]


def _benchmarks() -> str:
    return _sections(_benchmark_markdown())[0]


def _latency() -> str:
    section = _sections(_benchmark_markdown())[1]
    return section.split("\n", 1)[1]  # the page has its own heading


def _count(line: str, label: str) -> str:
    match = re.search(rf"{re.escape(label)}:?\s+(\d+)", line)
    if match is None:
        raise PluginError(f"{SOAK}: no {label!r} figure in {line!r}")
    return match[1]


def _soak() -> str:
    lines = SOAK.read_text().strip().splitlines()
    by_start = {line.strip().split(" (")[0].split(":")[0]: line.strip() for line in lines[1:]}
    told = by_start["told"].split(":", 1)[1].strip()
    rows = [
        ("the run", lines[0].split(": ", 1)[1]),  # "Soak (async): 10000 requests, ..."
        ("what clients were told", told),
        ("**lies** (non-2xx, row committed)", f"**{_count(by_start['lies'], 'row):')}**"),
        ("**lost commits** (2xx, no row)", f"**{_count(by_start['lost commits'], 'row):')}**"),
        (
            "**leaked connections**",
            f"**{_count(by_start['leaked connections'], 'afterwards):')}**",
        ),
        ("every other check", by_start["checks"].split(":", 1)[1].strip()),
    ]
    table = ["| | |", "| --- | --- |", *(f"| {what} | {figure} |" for what, figure in rows)]
    return "\n".join(
        [*table, "", "The report, as the test wrote it:", "", "```text", *lines, "```"]
    )


RENDERERS = {"benchmarks": _benchmarks, "latency": _latency, "soak": _soak}


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def render(match: re.Match[str]) -> str:
        renderer = RENDERERS.get(match["name"])
        if renderer is None:
            raise PluginError(f"{page.file.src_path}: no figures named {match['name']!r}")
        try:
            return renderer()
        except (OSError, KeyError, ValueError) as error:
            raise PluginError(
                f"{page.file.src_path}: figures {match['name']!r}: {error!r}"
            ) from error

    return MARKER.sub(render, markdown)


#: A Sphinx role left in a docstring (``:class:`SyncDatabase```), which mkdocstrings shows
#: as text before the code: the code alone is kept.
SPHINX_ROLE = re.compile(r":(?:attr|class|meth|func|exc|data|mod|obj):(?=<code>)")


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return SPHINX_ROLE.sub("", html)


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    files.append(File.generated(config, "figures/results.png", abs_src_path=str(CHART)))
    return files
