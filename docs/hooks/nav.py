"""MkDocs hook: leave out of the navigation the pages of ``mkdocs.yml`` that are not written yet.

A nav entry to a missing page fails a ``--strict`` build; this hook drops such entries (and sections
left empty) before MkDocs checks the nav, and logs each at info level.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.nav")


def _keep(entry, docs_dir: Path):
    """The entry with missing pages removed, or None when nothing of it is left."""
    if isinstance(entry, str):
        if entry.startswith(("http://", "https://")) or (docs_dir / entry).is_file():
            return entry
        log.info("nav: %s is not in %s yet; left out", entry, docs_dir)
        return None
    if isinstance(entry, dict):
        (title, value), = entry.items()
        if isinstance(value, list):
            kept = [k for k in (_keep(e, docs_dir) for e in value) if k is not None]
            return {title: kept} if kept else None
        kept = _keep(value, docs_dir)
        return {title: kept} if kept is not None else None
    return entry


def on_config(config, **kwargs):
    if config.nav:
        docs_dir = Path(config.docs_dir)
        config.nav = [k for k in (_keep(e, docs_dir) for e in config.nav) if k is not None]
    return config
