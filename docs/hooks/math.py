"""MkDocs hook: turn the pages' TeX into MathML when the site is built.

Equations are written as ``\\( … \\)`` (inline) or ``\\[ … \\]`` (display); ``pymdownx.arithmatex`` in
generic mode wraps them in ``<span class="arithmatex">`` / ``<div class="arithmatex">``. This hook
replaces each wrapped TeX by the MathML that ``latex2mathml`` makes of it, which browsers draw natively:
the site loads no math script, needs no network, and a formula that does not convert fails the build.
"""

from __future__ import annotations

import html
import re

_WRAPPED = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.DOTALL)
_DELIMITERS = {"span": ("\\(", "\\)", "inline"), "div": ("\\[", "\\]", "block")}


def tex_to_mathml(tex: str, display: str) -> str:
    """MathML of a TeX formula (``display``: "inline" or "block")."""
    from latex2mathml.converter import convert

    return convert(tex.strip(), display=display)


def _render(match: re.Match) -> str:
    tag, body = match.group(1), html.unescape(match.group(2)).strip()
    start, end, display = _DELIMITERS[tag]
    if body.startswith(start) and body.endswith(end):
        body = body[len(start):-len(end)]
    return f'<{tag} class="arithmatex">{tex_to_mathml(body, display)}</{tag}>'


def on_page_content(html_text: str, **kwargs) -> str:
    return _WRAPPED.sub(_render, html_text)
