"""Griffe extension: render gradxform's plain-text docstrings faithfully in the API reference.

gradxform's docstrings are Google style with two house habits that Markdown would mangle:

- the update rule is a plain paragraph (`u_t = g_t * min(1, max_norm / ||g_t||)`); Markdown
  would join its lines and read `g_t**2 ... mu_t**2` as bold, so it is fenced as a code block;
- state classes are NamedTuples whose fields are documented by trailing comments
  (`count: jax.Array  # int32 step counter`); the comment becomes the field's docstring.

It also reads `Example:` as the Google `Examples:` section, so doctests render as code; splits a
shared argument entry (`b1, b2: moment decay rates`) into one row per argument, so each gets
its type and default; and escapes a description starting with `>=` (Markdown would read a
quote). Only the rendered text changes: the source and its doctests are untouched.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from typing import Any

import griffe

# `u_t = ...`, `u_t[l] = ...`, `nu_max_t = ...`, `stable(opt) = ...`: a line defining a symbol.
_RULE = re.compile(r"^[A-Za-z][\w\[\]{}()+\-,.]*\s+=\s")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Returns|Yields|Raises|Examples|Attributes|Note|Notes|"
    r"Warning|Warnings|Reference|References|Other Parameters|Keyword Args):\s*$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence(lines: list[str]) -> list[str]:
    margin = min(_indent(line) for line in lines if line.strip())
    return ["", "```text", *(line[margin:] for line in lines), "```", ""]


_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+\.)\s")


def _is_table(lines: list[str]) -> bool:
    """Column-aligned lines (`after a reset:      u <- ...`): two spaces inside every line
    that is not a deeper-indented continuation of the one before."""
    base = _indent(lines[0])
    return len(lines) > 1 and all("  " in line.strip() or _indent(line) > base for line in lines)


def _paragraph(lines: list[str]) -> list[str]:
    """Fence an update rule; keep prose as prose, fencing the deeper-indented block that a
    prose line ending with `:` introduces (`... and then:` + indented cases)."""
    if _LIST_ITEM.match(lines[0]):
        return lines
    if _RULE.match(lines[0].strip()) or _is_table(lines):
        return _fence(lines)
    base, out, run = _indent(lines[0]), [], []
    for line in lines:
        if _indent(line) > base and (run or out[-1].rstrip().endswith(":")):
            run.append(line)
            continue
        if run:
            out.extend(_fence(run))
            run = []
        out.append(line)
    if run:
        out.extend(_fence(run))
    return out


def fence_update_rules(text: str) -> str:
    """Set the update rules and aligned formula blocks of a docstring as `text` code blocks.

    A paragraph whose first line is an equation (`x = ...`) or whose lines are all
    column-aligned is fenced whole; inside prose, a run of lines indented deeper than the
    paragraph is fenced. Google sections (`Args:`, `Examples:`, ...) and existing fences are
    left alone, so their own indentation keeps its meaning.
    """
    out: list[str] = []
    paragraph: list[str] = []
    section_indent: int | None = None
    in_fence = False

    def flush() -> None:
        if paragraph:
            out.extend(_paragraph(paragraph))
            paragraph.clear()

    for line in text.splitlines():
        if section_indent is not None:
            if not line.strip() or _indent(line) > section_indent:
                out.append(line)
                continue
            section_indent = None
        if line.lstrip().startswith("```"):
            flush()
            in_fence = not in_fence
            out.append(line)
        elif in_fence:
            out.append(line)
        elif _SECTION.match(line):
            flush()
            section_indent = _indent(line)
            out.append(line)
        elif line.strip():
            paragraph.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
_ITEM = re.compile(r"^(\s+)([\w*]+(?:,\s*[\w*]+)*):(\s*)(.*)$")


def split_shared_args(text: str) -> str:
    """In `Args:`, one entry per name (`a, b: text` -> `a: text` and `b: text`); escape `>`."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        header = _ARGS.match(lines[i])
        out.append(lines[i])
        i += 1
        if not header:
            continue
        indent = len(header.group(1))
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            item = _ITEM.match(lines[i])
            if not item:
                out.append(lines[i])
                i += 1
                continue
            lead, names, gap, rest = item.groups()
            if rest.startswith(">"):
                rest = "\\" + rest
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(lead):
                body.append(lines[i])
                i += 1
            for name in (n.strip() for n in names.split(",")):
                out.extend([f"{lead}{name}:{gap}{rest}", *body])
    return "\n".join(out)


def rewrite(text: str) -> str:
    return fence_update_rules(split_shared_args(_EXAMPLE.sub(r"\1Examples:", text)))


def _trailing_comments(code: str) -> dict[int, str]:
    """`{line number: comment text}` for every comment that follows code on its line."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            if tok.start[0] in code_lines:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    return comments


class GradxformDocstrings(griffe.Extension):
    """Fence update rules, read `Example:` as `Examples:`, document fields from comments."""

    def __init__(self) -> None:
        self._comments: dict[str, dict[int, str]] = {}

    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        self._rewrite(func)

    def on_class_instance(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        self._rewrite(cls)

    def on_module_instance(self, *, mod: griffe.Module, **kwargs: Any) -> None:
        self._rewrite(mod)

    def on_attribute_instance(
        self,
        *,
        node: ast.AST | griffe.ObjectNode,
        attr: griffe.Attribute,
        agent: Any,
        **kwargs: Any,
    ) -> None:
        parent = attr.parent
        if attr.docstring is not None or not isinstance(parent, griffe.Class):
            return
        code = getattr(agent, "code", None)
        if not code or attr.lineno is None:
            return
        filepath = str(getattr(agent, "filepath", ""))
        if filepath not in self._comments:
            self._comments[filepath] = _trailing_comments(code)
        comment = self._comments[filepath].get(attr.lineno)
        if comment:
            attr.docstring = griffe.Docstring(comment, lineno=attr.lineno, parent=attr)
