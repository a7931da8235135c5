"""The embeddable chat widget: its script and a demo page that embeds it (neither needs a key;
the page's own script tag carries one, meant to be scoped and read-only)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

WIDGET_JS = Path(__file__).parents[1] / "widget.js"  # app/widget.js, shipped as package data
router = APIRouter()


@router.get("/widget.js", response_class=PlainTextResponse, responses={200: {"content": {"application/javascript": {}}}})
def widget_js() -> Response:
    """The embeddable chat box: <script src=".../widget.js" data-collection="C" data-key="K"></script>."""
    return Response(WIDGET_JS.read_text(), media_type="application/javascript")


@router.get("/widget/demo", response_class=HTMLResponse)
def widget_demo(
    collection: Annotated[str, Query(description="Collection the widget asks.")] = "default",
    key: Annotated[str, Query(description="An API key meant for the widget (scoped, read-only).")] = "",
) -> HTMLResponse:
    """A demo page with the widget on it."""
    return HTMLResponse(DEMO_PAGE.format(collection=html.escape(collection, quote=True), key=html.escape(key, quote=True)))


DEMO_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moerag widget demo</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 3rem; max-width: 46rem; color: #222 }}</style></head>
<body>
<h1>An intranet page</h1>
<p>This page embeds moerag with one script tag. Ask a question in the box at the bottom right.</p>
<pre>&lt;script src="/widget.js" data-collection="{collection}" data-key="…"&gt;&lt;/script&gt;</pre>
<script src="/widget.js" data-collection="{collection}" data-key="{key}"></script>
</body></html>
"""
