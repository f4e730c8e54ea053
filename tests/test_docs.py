"""The product documentation: every relative link resolves (file and #anchor), the README stays a short
product page, and the text describes the product rather than how it was made."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

# Reports that tools write (docs/eval/**, docs/bench/**, docs/soak/**) and docs/robustness.md are not
# checked for wording; their links are checked like every other page's.
GENERATED = ("docs/eval/", "docs/bench/", "docs/soak/", "docs/robustness.md")

# How a page that narrates its own making reads: sittings, borrowed machines, issue numbers, "(new)".
NARRATION = [
    r"\bsessions?[- ]\d+",
    r"\b(this|that|earlier|previous|later|next) sessions?\b",
    r"\bsittings?\b",
    r"\blent\b",
    r"\bearlier machines\b",
    r"\b(DESIGN|STYLE)\.md\b",
    r"\bissue\s*#?\d+",
    r"\(issue\)",
    r"\(new[);,]",
    r"\buntil now\b",
]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def product_pages() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "model_repository/README.md", ROOT / "deploy/README.md"]
    pages += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "pretrained").glob("*/README.md"))
    return [p for p in pages if p.is_file()]


def all_pages() -> list[Path]:
    return sorted({*product_pages(), *(ROOT / "docs").rglob("*.md")})


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def prose(text: str) -> str:
    """The page without fenced code blocks (commands and code are not links or narration)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    return broken


@pytest.mark.parametrize("page", all_pages(), ids=rel)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_the_link_check_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading, with `code`\n\n## Which Δ?\n")
    page.write_text("[ok](other.md#a-heading-with-code) [ok](other.md#which-δ) [web](https://example.com)\n"
                    "[gone](missing.md) [bad anchor](other.md#nope)\n\n```\n[in code](nowhere.md)\n```\n")
    broken = broken_links(page)
    assert len(broken) == 2
    assert broken[0] == "missing.md: no such file"
    assert broken[1] == "other.md#nope: no heading #nope in other.md"


def test_readme_is_a_short_product_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("page", [p for p in product_pages() if not rel(p).startswith(GENERATED)], ids=rel)
def test_product_docs_describe_the_product_not_its_making(page):
    text = prose(page.read_text(encoding="utf-8"))
    found = [f"line {text[:m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
             for pattern in NARRATION for m in re.finditer(pattern, text, re.I)]
    assert found == [], f"{rel(page)} narrates how it was made"


def test_the_narration_check_finds_narration():
    # The planted narration is assembled from parts so that this file itself reads as no narration.
    planted = ["measured in " + "session" + " 5", "a GPU " + "lent" + " for the run", "see " + "DESIGN" + ".md",
               "issue" + " #22", "`--refine` (" + "new)."]
    for sample in planted:
        assert any(re.search(p, sample, re.I) for p in NARRATION), sample
    assert not any(re.search(p, "three ONNX Runtime sessions share two cores; new captions", re.I) for p in NARRATION)
