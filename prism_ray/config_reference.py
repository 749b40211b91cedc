"""The config reference (docs/config.md), generated from the dataclasses of `prism_ray.config`.

Every field with its YAML type, default, allowed values (choices, bounds, and the names some fields take from
the registry or the presets) and the one line of its `doc=` metadata. `prism-ray config-reference` prints it;
tests/test_config_reference.py fails when docs/config.md differs from what the code generates.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal

from prism_ray import config as C
from prism_ray.config_loader import describe_type

REFERENCE_PATH = "docs/config.md"
REGENERATE = "prism-ray config-reference --out docs/config.md"


def _architectures() -> str:
    from prism_ray.algo.teachers import ARCHITECTURES
    return ", ".join(f"`{a}`" for a in sorted(ARCHITECTURES))


def _presets(kind: str) -> Callable[[], str]:
    def names() -> str:
        from prism_ray.config_loader import list_presets
        return ", ".join(f"`{p}`" for p in list_presets(kind))
    return names


# Fields whose allowed values are names known elsewhere (the architecture registry, the preset files).
NAMED_VALUES: dict[str, Callable[[], str]] = {
    "teachers.models[].arch": _architectures,
    "evaluate.students": lambda: "items from: " + _architectures(),
    "recover.preset": _presets("recover"),
    "evaluate.recipe": _presets("evaluate"),
}
BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def type_name(tp: Any) -> str:
    """The YAML type of a field, in a few words."""
    return describe_type(tp, brief=True)


def _yaml(value: Any) -> str:
    if value is None:
        return "empty"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def default_text(f: dataclasses.Field) -> str:
    if f.default is None:
        return "empty"
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_yaml(f.default_factory())}`"
    return "required"


def allowed_text(path: str, tp: Any, meta: Any) -> str:
    parts = []
    literals = [a for a in _flatten(tp) if typing.get_origin(a) is Literal]
    for lit in literals:
        parts.append(", ".join(f"`{_yaml(a)}`" for a in typing.get_args(lit)))
    bounds = [f"{sym} {meta[k]:g}" for k, sym in BOUNDS if k in meta]
    if bounds:
        parts.append(" and ".join(bounds))
    if meta.get("nonempty"):
        parts.append("not empty")
    if path in NAMED_VALUES:
        parts.append(NAMED_VALUES[path]())
    return "; ".join(parts)


def _flatten(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is typing.Union:
        return [a for arg in typing.get_args(tp) for a in _flatten(arg)]
    return [tp]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _summary(cls: type) -> str:
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # dataclasses invent a signature


def section_table(path: str, cls: type) -> list[str]:
    """The Markdown table of one config section (or of a list item's fields, path ending in '[]')."""
    hints = typing.get_type_hints(cls)
    lines = ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        fpath = f"{path}.{f.name}"
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"`{f.name}`", type_name(hints[f.name]), default_text(f), allowed_text(fpath, hints[f.name], f.metadata),
            f.metadata.get("doc", ""))) + " |")
    return lines


def sections() -> list[tuple[str, type]]:
    """(path, dataclass) of every table: the Config sections in order, list items after their section."""
    out = []
    hints = typing.get_type_hints(C.Config)
    for f in dataclasses.fields(C.Config):
        if f.name.startswith("_"):
            continue
        cls = hints[f.name]
        out.append((f.name, cls))
        item_hints = typing.get_type_hints(cls)
        for g in dataclasses.fields(cls):
            tp = item_hints[g.name]
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                out.append((f"{f.name}.{g.name}[]", typing.get_args(tp)[0]))
    return out


def missing_docs() -> list[str]:
    """Dotted paths of the fields without a `doc=` line (the reference must explain every field)."""
    return [f"{path}.{f.name}" for path, cls in sections() for f in dataclasses.fields(cls)
            if not f.name.startswith("_") and not f.metadata.get("doc")]


def _presets_section() -> list[str]:
    from prism_ray.config_loader import list_presets, load_preset

    lines = ["## Presets", "",
             "`recover.preset` and `evaluate.recipe` (and each `baselines.recover` entry's `preset`) fill in a method's "
             "values from `prism_ray/presets/`; keys written in the config win over the preset's.", ""]
    for kind, key in (("recover", "preset"), ("evaluate", "recipe")):
        for name in list_presets(kind):
            values = load_preset(kind, name, f"{kind}.{key}")
            lines.append(f"- `{kind}.{key}: {name}`: " + ", ".join(f"`{k}: {_yaml(v)}`" for k, v in values.items()))
    return lines + [""]


def reference_markdown() -> str:
    """docs/config.md: every config field, generated from the dataclasses (do not edit the file by hand)."""
    lines = ["# Config reference", "",
             f"<!-- Generated from prism_ray/config.py by `{REGENERATE}`; do not edit by hand. -->", "",
             "Every field of a prism-ray YAML config, section by section: its type, default, allowed values and "
             "meaning. A config sets only what differs from the defaults; `--set section.key=value` overrides a "
             "field from the command line; `prism-ray validate CONFIG` prints the resolved config. Values are "
             "checked before any work starts, and an error names the field (`recover.lr: got -1; allowed: > 0`). "
             "\"empty\" means the YAML value `null` (or leaving the key out).", ""]
    for path, cls in sections():
        title = f"`{path}`" if path.endswith("[]") else f"`{path}:`"
        lines += [f"## {title}", ""]
        summary = _summary(cls)
        if summary:
            lines += [summary, ""]
        lines += section_table(path, cls) + [""]
    lines += _presets_section()
    return "\n".join(lines).rstrip("\n") + "\n"


__all__ = ["REFERENCE_PATH", "REGENERATE", "reference_markdown", "missing_docs", "type_name"]
