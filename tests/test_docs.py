"""The product documentation: every relative link resolves (file and #anchor), the README stays a short
product page, and the text describes the product rather than how it was made: the docs, and the words of
the code, scripts, tests and configs (comments, docstrings, help and messages)."""

from __future__ import annotations

import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

# Reports that tools write (docs/eval/**, docs/bench/**, docs/soak/**) and docs/robustness.md are not
# checked for wording; their links are checked like every other page's.
GENERATED = ("docs/eval/", "docs/bench/", "docs/soak/", "docs/robustness.md")

# How a page that narrates its own making reads: the work periods it was written in, machines it had for
# a while, tracker numbers, a change marked as fresh, paths of the workplace. Each pattern is written so
# that its own source text never matches it (a leading \b, an escape or a class before the word), so this
# file passes its own check.
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
    r"\b(first|second|third|fourth|fifth|sixth|last|previous|earlier|another) (GPU|device) (runs?|calls?|machines?)\b",
    r"\bdevice (time|budget)\b",
    r"\bborrowed (GPU|machine)s?\b",
    r"[/]work/shared\b",
]

# Code, scripts, tests and configs are read for the same words: every file of these kinds under these
# folders (tracked or new, not ignored), plus the model cards and configs of the shipped folders. In
# Python files only comments and strings are read (`new` is a fine variable name).
CODE_DIRS = ("boot", "boot_serve", "distill", "demo", "shapes_world", "boot_tools", "scripts", "tests", "deploy",
             "model_repository")
CODE_SUFFIXES = (".py", ".sh", ".md", ".toml", ".json")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def product_pages() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "model_repository/README.md", ROOT / "deploy/README.md"]
    pages += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "pretrained").glob("*/README.md"))
    return [p for p in pages if p.is_file()]


def all_pages() -> list[Path]:
    return sorted({*product_pages(), *(ROOT / "docs").rglob("*.md")})


def code_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *CODE_DIRS],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
        files = [ROOT / f for f in listed]
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without git
        files = [f for d in CODE_DIRS for f in (ROOT / d).rglob("*")
                 if not {"__pycache__", "tokenizer"} & set(f.relative_to(ROOT).parts)]
    files += [*(ROOT / "pretrained").glob("*/README.md"), *(ROOT / "pretrained").glob("*/*.json"),
              ROOT / "pyproject.toml"]
    return sorted({f for f in files if f.suffix in CODE_SUFFIXES and f.is_file()})


def words(path: Path) -> str:
    """What a file says in words: for Python its comments and strings, the code blanked out (lines kept, so
    line numbers stay those of the file); any other file's whole text."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return text
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    kept = [c if c == "\n" else " " for c in text]
    kinds = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in kinds:
            a, b = starts[tok.start[0] - 1] + tok.start[1], starts[tok.end[0] - 1] + tok.end[1]
            kept[a:b] = text[a:b]
    return "".join(kept)


def narration(text: str) -> list[str]:
    return [f"line {text[:m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
            for pattern in NARRATION for m in re.finditer(pattern, text, re.I)]


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
    assert narration(prose(page.read_text(encoding="utf-8"))) == [], f"{rel(page)} narrates how it was made"


def test_code_scripts_and_tests_describe_the_product_not_their_making():
    files = code_files()
    assert {rel(f).split("/")[0] for f in files} >= {"boot", "distill", "boot_serve", "scripts", "tests", "pretrained"}
    assert ROOT / "tests/test_docs.py" in files
    found = {rel(f): hits for f in files if (hits := narration(words(f)))}
    assert found == {}, "these files narrate how they were made"


def test_the_narration_check_finds_narration():
    # The planted narration is assembled from parts inside words so that no string of this file matches.
    planted = ["measured in ses" + "sion 5", "a GPU le" + "nt for the run", "see DES" + "IGN.md",
               "iss" + "ue #22", "`--refine` (n" + "ew).", "the thi" + "rd GPU run", "its dev" + "ice time",
               "notes in /wo" + "rk/shared/x"]
    for sample in planted:
        assert any(re.search(p, sample, re.I) for p in NARRATION), sample
    assert not any(re.search(p, "three ONNX Runtime sessions share two cores; new captions", re.I) for p in NARRATION)
    assert not any(re.search(p, "the GPU run of the bench; a device-time budget", re.I) for p in NARRATION)


def test_the_narration_check_reads_the_words_of_code(tmp_path):
    source = tmp_path / "tool.py"
    fresh, loaned = "n" + "ew", "le" + "nt"
    source.write_text(f'def make({fresh}):\n    return list({fresh})  # a tool ({fresh})\n\n\nHELP = """on a\n'
                      f'GPU {loaned} for it"""\n')
    found = narration(words(source))
    assert sorted(found) == [f"line 2: '({fresh})'", f"line 6: '{loaned}'"]  # the comment and string, not code
    assert source.read_text().count(f"({fresh})") == 3
