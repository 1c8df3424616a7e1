"""README.md and docs/: every relative link resolves, and the README fits on a page."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGES += [ROOT / "benchmarks" / "README.md", ROOT / "examples" / "minilm" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links(page: pathlib.Path):
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
  for target in LINK.findall(text):
    if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
      yield target


@pytest.mark.parametrize(
  "page", [p for p in PAGES if p.exists()], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(page):
  missing = []
  for target in _links(page):
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
      missing.append(target)
    elif anchor and resolved.suffix == ".md":
      # GitHub's anchors: headings lower-cased, punctuation dropped, spaces as hyphens.
      headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
      slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
      if anchor not in slugs:
        missing.append(target)
  assert not missing, f"{page.relative_to(ROOT)}: links to nothing: {missing}"


def test_readme_fits_on_a_page_and_links_every_docs_page():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 200
  for page in (ROOT / "docs").glob("*.md"):
    assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
