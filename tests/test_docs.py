"""The README is the user's page: short, its two commands first, every config section and every command listed,
and every page it links to there. The fields themselves live in docs/config.md (tests/test_config_reference.py)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from prism_ray.cli import build_parser
from prism_ray.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _table_rows(text: str, header: str) -> list[str]:
    """The first cell of each row of the table whose header row starts with `| header |`."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith(f"| {header} |"):
            inside = True
        elif inside and line.startswith("|"):
            if not line.startswith("|---"):
                rows.append(line.split(" | ")[0].lstrip("| "))
        elif inside:
            break
    return rows


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines: move detail to a page under docs/"


def test_readme_starts_with_the_two_commands():
    # .ci/run runs `make test` as the README's test command; the demo is the other one
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_page_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), f"README links {link}, which does not exist"


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README.read_text()))
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"pages nobody finds from the README: {sorted(pages - linked)}"


def test_config_table_lists_every_section_and_points_to_the_reference():
    text = README.read_text()
    rows = {re.fullmatch(r"`(\w+)`", cell).group(1) for cell in _table_rows(text, "section")}
    sections = {f.name for f in dataclasses.fields(Config) if not f.name.startswith("_")}
    assert rows == sections, f"README config table: missing {sorted(sections - rows)}, extra {sorted(rows - sections)}"
    assert "](docs/config.md)" in text and "prism-ray config-reference --out docs/config.md" in text


def test_commands_table_lists_every_command():
    text = README.read_text()
    shown = {word for cell in _table_rows(text, "command") for word in re.findall(r"`([\w-]+)[^`]*`", cell)}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert shown == set(sub.choices), (f"README commands table: missing {sorted(set(sub.choices) - shown)}, "
                                       f"not a command {sorted(shown - set(sub.choices))}")


def test_make_check_names_test_files_that_exist_and_leaves_pipelines_to_make_test():
    """`make check` lists its tests by path: a moved or renamed file must not silently drop out of the quick loop."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (paths,) = re.findall(r"^CHECK_TESTS := (.+)$", text, flags=re.M)
    paths = paths.split()
    assert len(paths) >= 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == []
    # the quick loop holds none of the modules that run whole pipelines (those are `make test`'s)
    assert not any(p.startswith(("tests/test_rehearsal", "tests/test_chaos", "tests/test_sweep")) for p in paths)


def test_the_suite_hands_out_test_files_that_exist_first():
    """The two test processes take the longest modules first (tests/conftest.py): a renamed file would silently
    fall back to its collection order and leave one process running it alone at the end."""
    from tests.conftest import LONGEST_FIRST

    assert len(LONGEST_FIRST) == len(set(LONGEST_FIRST)) >= 5
    assert [p for p in LONGEST_FIRST if not (ROOT / p).is_file()] == []
