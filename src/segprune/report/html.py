"""`report.html`: one self-contained page (inline CSS, images as base64 PNG data URIs, no script, no URL).

Built from string templates. Every string that comes from a user, a recipe, a file or a model (titles, notes,
layer and run names, recipe values) goes through `html.escape`; numbers are formatted here.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em;
       line-height: 1.4; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; }
figcaption { color: #555; font-size: 0.95em; }
figure img { display: block; width: 100%; height: auto; }  /* plots are drawn at the column's width: full size */
img { max-width: 100%; }
.note { color: #8a4b00; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def page(title: str, sections: Iterable[str]) -> str:
    """A whole HTML document; `sections` are HTML fragments made by the functions below."""
    return PAGE.format(title=escape(title), style=STYLE, body="\n".join(sections))


def section(heading: str, *parts: str) -> str:
    return f"<section>\n<h2>{escape(heading)}</h2>\n" + "\n".join(parts) + "\n</section>"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A table of plain values (each escaped as text)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def figure(png: bytes, caption: str) -> str:
    """An embedded PNG with its caption (also the alt text)."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def notes(lines: Iterable[str], *, css: str = "") -> str:
    items = "".join(f"<li>{escape(line)}</li>" for line in lines)
    klass = f' class="{escape(css)}"' if css else ""
    return f"<ul{klass}>{items}</ul>" if items else ""
