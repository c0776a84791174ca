"""The docs stay true to the code and to each other: docs/flags.md is what the code generates, every relative link
in README.md and docs/*.md reaches a file (and, with #anchor, a heading in it), and the README stays a front page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000  # characters: a front page; the depth lives in docs/

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)


def prose(text: str) -> str:
    """The text without code blocks (a `# comment` there is not a heading, `a[i](x)` is not a link)."""
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (not - and _), spaces to dashes, -1, -2 on repeats."""
    seen, found = {}, set()
    for heading in HEADING.findall(prose(path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(INLINE_CODE.sub("", prose(path.read_text())))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not ours to check


def test_flag_reference_is_generated_from_the_code():
    from minitrain.tools import flag_docs

    committed = (ROOT / "docs" / "flags.md").read_text()
    assert committed == flag_docs.render(), (
        f"docs/flags.md differs from the flags in the code; run: {flag_docs.COMMAND}")


def test_every_relative_link_reaches_a_file_and_its_heading():
    assert len(PAGES) > 1, "no docs/*.md pages found"
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            file_part, _, anchor = target.partition("#")
            file = (page.parent / file_part).resolve() if file_part else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading '{anchor}' in {file.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links_and_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `code` title: here\n\n## Again\n## Again\n\n[x](other.md#y) `[no](link)` [web](https://a.b)\n"
                    "```bash\n# not a heading [no](link)\n```\n")
    assert anchors(page) == {"a-code-title-here", "again", "again-1"}
    assert relative_links(page) == ["other.md#y"]


def test_the_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_text())
    assert size <= README_LIMIT, (
        f"README.md has {size:,} characters, over the {README_LIMIT:,} of a front page; move the depth into docs/")


def test_the_readmes_causal_families_are_the_ones_the_family_tests_accept():
    """README's list of causal LM families 'each checked on CPU against the model's own forward' is exactly the zoo
    tests/test_families.py checks and accepts (tests/tiny_models.py: ZOO less REFUSED), in its order."""
    from tests.tiny_models import REFUSED, ZOO

    text = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"Causal LMs, each checked on CPU against the model's own forward and cross-entropy: (.+?) \(",
                       text).group(1)
    assert re.split(r", | and ", listed) == [a for a in ZOO if a not in REFUSED]
