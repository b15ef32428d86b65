"""The settings reference, generated from the config dataclasses (``core.config``, ``app.settings``): every
setting with its default, what it accepts (its rule's words, or its enum's values) and the
comments written beside it. The docs site builds it (``docs/hooks.py``), so it cannot go
stale: a new field is documented the moment it has a comment."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from enum import Enum
from typing import Any

from tbptt_exp.app.settings import RunConfig
from tbptt_exp.core.config import DATA_KINDS, enum_of, field_hints


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the comment lines right above it and the one at its end, in the
    class that declares it (``RunConfig``'s experiment settings are ``ExperimentConfig``'s)."""
    found = {}
    for owner in reversed(cls.__mro__[:-1]):
        if dataclasses.is_dataclass(owner):
            found |= own_field_comments(owner)
    return found


def own_field_comments(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        found[node.target.id] = " ".join(above + beside)
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(setting, default, accepts, meaning) for each of ``cls``'s own settings."""
    hints, comments, out = field_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            continue  # a group: its own table
        enum = enum_of(hints[f.name])
        if "rule" in f.metadata:
            accepts = f.metadata["rule"].allowed
        elif enum is not None:
            accepts = "one of " + ", ".join(f"`{m.value}`" for m in enum)
        else:
            accepts = ""
        out.append((f"`{prefix}{f.name}`", f"`{_shown(default)}`", accepts, comments.get(f.name, "")))
    return out


def table(title: str, doc: str, entries: list[tuple[str, str, str, str]]) -> str:
    head = [f"## {title}", "", *([doc, ""] if doc else []),
            "| setting | default | accepts | what it is |", "|---|---|---|---|"]
    return "\n".join(head + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in entries]) + "\n"


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # a dataclass's generated one


def reference_markdown() -> str:
    """Every setting of one experiment, a table per group."""
    top = RunConfig()
    parts = [table("Top level", "", rows(RunConfig, ""))]
    for f in dataclasses.fields(RunConfig):
        group = getattr(top, f.name)
        if not dataclasses.is_dataclass(group) or f.name == "data":
            continue
        parts.append(table(f"{f.name}", _doc(type(group)), rows(type(group), f"{f.name}.")))
    for kind, cls in DATA_KINDS.items():
        parts.append(table(f"data={kind}", _doc(cls), rows(cls, "data.")))
    return "\n".join(parts)
