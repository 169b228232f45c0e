"""Sphinx extension of the book: every page loads each of its scripts once.

The Jupyter Book 1 stack registers sphinx-thebe's inline configuration script twice,
and a page that declares ``const THEBE_JS_URL`` twice logs a JavaScript error. Each page
keeps the first of identical scripts.
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        # An inline script's file name is None or "" depending on who added it.
        name = getattr(script, "filename", script) or ""
        key = (str(name), repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
