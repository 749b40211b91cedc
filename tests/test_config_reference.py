"""docs/config.md is generated from the config dataclasses: it lists every field and never drifts from the code."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from prism_ray.cli import main
from prism_ray.config_reference import REFERENCE_PATH, REGENERATE, missing_docs, reference_markdown, sections

ROOT = Path(__file__).resolve().parents[1]


def doc_tables(text: str) -> dict[str, dict[str, list[str]]]:
    """section path -> field -> its row's cells (type, default, allowed, meaning), parsed from the Markdown."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"## `([\w.\[\]]+?):?`$", line)
        if m:
            current = tables.setdefault(m.group(1), {})
            continue
        m = re.match(r"\| `(\w+)` \| (.*) \|$", line)
        if m and current is not None:
            current[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
    return tables


def test_docs_config_md_is_what_the_code_generates():
    committed = (ROOT / REFERENCE_PATH).read_text(encoding="utf-8")
    assert committed == reference_markdown(), f"{REFERENCE_PATH} is out of date: run `{REGENERATE}` and commit it"


def test_every_field_has_a_line_of_meaning():
    assert missing_docs() == [], "give these fields a doc= in prism_ray/config.py, then run " + REGENERATE


def test_every_field_of_every_section_is_in_the_reference():
    tables = doc_tables(reference_markdown())
    for path, cls in sections():
        assert set(tables[path]) == {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}, path
    assert {"run", "data", "teachers", "teachers.models[]", "recover", "evaluate", "ray", "storage"} <= set(tables)


def test_rows_say_type_default_allowed_values_and_meaning():
    tables = doc_tables(reference_markdown())
    assert tables["recover"]["selection"][:3] == ["choice", "`pre`", "`pre`, `intra`, `fixed`"]
    assert tables["recover"]["lr"][:3] == ["float", "`0.05`", "> 0"]
    assert tables["recover"]["preset"][1:3] == ["empty", "`prism`, `sre2l`"]
    assert tables["data"]["resolution"][2] == ">= 8 and <= 1024"
    assert tables["ray"]["workers"][:3] == ["int or choice", "`2`", "`auto`"]
    assert tables["teachers.models[]"]["arch"][1] == "required" and "`resnet18`" in tables["teachers.models[]"]["arch"][2]
    assert tables["evaluate"]["seeds"][1:3] == ["`[0, 1, 2]`", "not empty"]
    assert "paired" in tables["evaluate"]["seeds"][3]
    assert tables["data"]["verify"][:3] == ["choice or bool", "`auto`", "`auto`, `true`, `false`"]


def test_the_command_prints_and_writes_the_reference(tmp_path, capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    out = tmp_path / "config.md"
    assert main(["config-reference", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference_markdown()


def test_a_new_field_changes_the_reference(monkeypatch):
    # the drift check is real: a field added to a section shows up in the generated text (and so fails the
    # comparison with the committed file until it is regenerated)
    from prism_ray import config as C

    before = reference_markdown()
    fields = [(f.name, typing.get_type_hints(C.SqueezeConfig)[f.name], f) for f in dataclasses.fields(C.SqueezeConfig)]
    extra = dataclasses.make_dataclass("SqueezeConfig", [*fields, ("warmup", int, C._f(3, ge=0, doc="warm-up epochs"))])
    extra.__doc__ = C.SqueezeConfig.__doc__
    monkeypatch.setitem(C.Config.__annotations__, "squeeze", extra)
    monkeypatch.setattr(C, "SqueezeConfig", extra)
    after = reference_markdown()
    assert after != before
    assert doc_tables(after)["squeeze"]["warmup"] == ["int", "`3`", ">= 0", "warm-up epochs"]
