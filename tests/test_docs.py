"""The documentation stays true: every ```python block in `docs/` runs (each page's blocks in
order, in one namespace), the site builds with `mkdocs build --strict`, and the API reference
documents every public name of `gradxform`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import pytest

import gradxform as gx

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = ["getting-started.md", "concepts.md", "stability.md", "distributed.md", "migrating.md"]

# A fenced block opening with ```python (info string after it allowed), closed by ``` at the
# same indentation (blocks may sit indented inside admonitions or list items).
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python(?P<info>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
NOT_RUN = 'title="not-run"'


def snippets(text: str) -> list[tuple[int, str]]:
    """`(first line number, dedented code)` of each runnable ```python block of `text`."""
    found = []
    for m in FENCE.finditer(text):
        if NOT_RUN in m.group("info"):
            continue
        line = text.count("\n", 0, m.start("code")) + 1
        found.append((line, textwrap.dedent(m.group("code"))))
    return found


def pages_with_snippets() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if snippets(p.read_text()))


def public_names() -> list[str]:
    return sorted(
        name
        for name in dir(gx)
        if not name.startswith("_") and not isinstance(getattr(gx, name), types.ModuleType)
    )


def test_snippet_extraction_finds_blocks_with_their_line_numbers():
    text = (
        "# t\n"
        "```python\nx = 1\n```\n"
        "```bash\nnot python\n```\n"
        '```python title="not-run"\nraise SystemExit\n```\n'
        "!!! note\n    ```python\n    y = x + 1\n    ```\n"
    )
    assert snippets(text) == [(3, "x = 1\n"), (13, "y = x + 1\n")]


def test_no_python_block_escapes_the_runner():
    """A block tagged ```py or ```pycon would be shown as Python but never run."""
    for page in DOCS.rglob("*.md"):
        tags = re.findall(r"^[ \t]*```(py\w*)", page.read_text(), re.MULTILINE)
        assert set(tags) <= {"python"}, f"{page}: use ```python (run by this test), not {tags}"


def test_every_guide_has_runnable_snippets():
    have = {p.relative_to(DOCS).as_posix() for p in pages_with_snippets()}
    assert set(GUIDES) <= have, f"guides without a runnable ```python block: {set(GUIDES) - have}"


@pytest.mark.parametrize(
    "page", pages_with_snippets(), ids=lambda p: p.relative_to(DOCS).as_posix()
)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files (plots, checkpoints) write here
    namespace: dict = {"__name__": "__docs__"}
    # The snippets are user code, which broadcasts biases as users do (`x @ w + b`); the
    # library's own code stays under conftest's strict rank promotion in the other tests.
    with jax.numpy_rank_promotion("allow"):
        for line, code in snippets(page.read_text()):
            # Pad with newlines so a traceback names the Markdown file and its real line.
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    assert (site / "api" / "clipping.html").is_file()


def test_site_works_opened_from_disk(site):
    """Opened as files (file://), a link must name a file: a folder shows a directory listing.
    Search must not need a server either: its index ships as a script (Material's `offline`
    plugin; the theme loads it instead of fetching the JSON when the protocol is file:)."""
    for page in site.rglob("*.html"):
        if page.name == "404.html":  # shown by a server only, which resolves its root links
            continue
        for href in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            target = href.split("#", 1)[0].split("?", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):  # same page, or http(s)/mailto/data
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_file(), f"{page.relative_to(site)} links to {href}: not a file"
    assert (site / "search" / "search_index.js").read_text().startswith("var __index = {")


def test_api_reference_documents_every_public_name(site):
    ids = set()
    for page in (site / "api").rglob("*.html"):
        ids |= set(re.findall(r'id="(gradxform\.[\w.]+)"', page.read_text()))
    # `gradxform.<module>.<name>` headings, or `gradxform.<name>` anchors for optax's objects;
    # deeper ids are fields (`...ScaleByAdamState.mu`) and do not count.
    documented = {i.rsplit(".", 1)[-1] for i in ids if i.count(".") <= 2}
    missing = [n for n in public_names() if n not in documented]
    assert not missing, (
        f"public names with no entry in the API reference: {missing}; add them to the module's "
        "page under docs/api/ (`members:` list of its `::: gradxform.<module>` block)"
    )


def test_rendered_reference_shows_update_rules_fields_and_examples(site):
    html = (site / "api" / "adaptive.html").read_text()
    assert "mu_t = b1 * mu_{t-1}" in html  # the update rule, verbatim in a code block
    assert "<strong>2" not in html  # ... not read as Markdown emphasis (g_t**2 ... mu_t**2)
    assert "first moment (EMA of g), dtype" in html  # a state field's comment, as its docs
    assert 'id="gradxform.adaptive.ScaleByAdamState.mu"' in html
    assert "&gt;&gt;&gt; </span>" in html  # doctests highlighted as code, not as quotes
