"""The README's config table lists exactly the fields the config classes have, section by section."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from prism_ray.config import Config, TeacherSpec

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_fields() -> dict[str, set[str]]:
    """section -> the bold `field` names of its row in the README's config table."""
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"\*\*`(\w+)`\*\*", m.group(2)))
    return rows


def test_config_table_matches_the_dataclasses():
    rows = readme_fields()
    defaults = Config()
    sections = [f.name for f in dataclasses.fields(Config) if not f.name.startswith("_")]
    assert set(rows) >= set(sections), f"sections missing from the README table: {set(sections) - set(rows)}"
    for name in sections:
        expected = {f.name for f in dataclasses.fields(getattr(defaults, name))}
        if name == "teachers":
            expected |= {f.name for f in dataclasses.fields(TeacherSpec)}
        assert rows[name] == expected, (f"README row `{name}`: missing {sorted(expected - rows[name])}, "
                                        f"not in the config {sorted(rows[name] - expected)}")


def test_the_table_parser_sees_fields():
    rows = readme_fields()
    assert {"lr", "ipc", "primary"} <= rows["recover"] and "address" in rows["ray"]
