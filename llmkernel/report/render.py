"""The report rendered twice from one document: a self-contained HTML page and its Markdown twin.

The page must open from a file on a machine with no network (a laptop on a plane, a CI artefact), so
nothing it shows may be fetched: inline CSS, every plot a data: URI, no script, no URL. Configs fold into
`<details>`, which browsers open without JavaScript. Markdown cannot inline images portably, so there each
figure is a file under `report_files/` (written by build.py) linked relatively: the folder can be moved,
committed or attached as a whole.
"""

from __future__ import annotations

import base64
import html
import re
import struct

from llmkernel.report.document import Block, Code, Figure, Heading, Report, Section, Table, Text, cell

FILES = "report_files"  # the Markdown's PNGs, beside report.md


# ----------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       margin: 0; background: #f6f7f9; }
header, main { max-width: 1060px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 22px; margin: 0 0 8px; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 17px; margin: 24px 0 8px; }
section, nav { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px;
               margin: 16px 0; }
.subtitle, .intro { color: #57606a; }
.scroll { overflow-x: auto; margin: 8px 16px 12px 0; display: inline-block; vertical-align: top;
          max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f4; }
td { max-width: 460px; overflow-wrap: break-word; }
figure { margin: 12px 16px 12px 0; display: inline-block; vertical-align: top; max-width: 100%; }
img { max-width: 100%; height: auto; display: block; }
figcaption { color: #57606a; font-size: 13px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px;
      overflow-x: auto; font-size: 12px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
details { margin: 6px 0; }
summary { cursor: pointer; }
ul.runs { columns: 2; margin: 4px 0 0; padding-left: 20px; font-size: 13px; }
"""


def inline(text: str) -> str:
    """Escaped text with `backticks` as code (the only markup the section builders use)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(value))}</td>" for value in row) + "</tr>"
        for row in table.rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk (bytes 16-24), so the page reserves the space."""
    return struct.unpack(">II", png[16:24])


def _html_figure(figure: Figure) -> str:
    alt = html.escape(figure.alt, quote=True)
    width, height = png_size(figure.png)
    # The caption wraps at the plot's width, so a small plot can sit beside a table.
    return (
        f'<figure style="max-width: {width}px"><img src="{data_uri(figure.png)}" alt="{alt}" '
        f'width="{width}" height="{height}" data-name="{html.escape(figure.name)}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def _html_code(code: Code) -> str:
    pre = f"<pre><code>{html.escape(code.text)}</code></pre>"
    return f"<details><summary>{inline(code.summary)}</summary>{pre}</details>" if code.summary else pre


def block_html(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h3>{inline(block.text)}</h3>"
    if isinstance(block, Text):
        return f"<p>{inline(block.text)}</p>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        return _html_figure(block)
    return _html_code(block)


def section_html(section: Section) -> str:
    blocks = "\n".join(block_html(block) for block in section.blocks)
    return (
        f'<section id="{section.id}">\n<h2>{html.escape(section.title)}</h2>\n'
        f'<p class="intro">{inline(section.intro)}</p>\n{blocks}\n</section>'
    )


def render_html(report: Report) -> str:
    contents = "".join(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in report.sections)
    runs = "".join(f"<li>{html.escape(run)}</li>" for run in report.runs)
    sections = "\n".join(section_html(section) for section in report.sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(report.title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{html.escape(report.title)}</h1>
<p class="subtitle">{inline(report.subtitle)}</p>
<ul class="runs">{runs}</ul>
<nav id="contents"><h2>Contents</h2><ol>{contents}</ol></nav>
</header>
<main>
{sections}
</main>
</body>
</html>
"""


# ------------------------------------------------------------------------------------------- Markdown


def figure_path(figure: Figure) -> str:
    return f"{FILES}/{figure.name}.png"


def _escape_cell(text: str) -> str:
    # A pipe ends a cell and a newline ends the row; angle brackets in model output are text, not HTML.
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _markdown_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(_escape_cell(h) or " " for h in table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
    ]
    lines += ["| " + " | ".join(_escape_cell(cell(value)) for value in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _markdown_code(code: Code) -> str:
    fence = "````" if "```" in code.text else "```"
    body = f"{fence}yaml\n{code.text}\n{fence}" if code.summary else f"{fence}\n{code.text}\n{fence}"
    return f"**{code.summary}**\n\n{body}" if code.summary else body


def block_markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"### {block.text}"
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Table):
        return _markdown_table(block)
    if isinstance(block, Figure):
        alt = block.alt.replace("[", "(").replace("]", ")")
        return f"![{alt}]({figure_path(block)})"
    return _markdown_code(block)


def section_markdown(section: Section) -> str:
    parts = [f'<a id="{section.id}"></a>\n\n## {section.title}', section.intro]
    parts += [block_markdown(block) for block in section.blocks]
    return "\n\n".join(parts)


def render_markdown(report: Report) -> str:
    contents = "\n".join(f"{n}. [{s.title}](#{s.id})" for n, s in enumerate(report.sections, 1))
    runs = "\n".join(f"- {run}" for run in report.runs)
    parts = [f"# {report.title}", report.subtitle, runs, f"## Contents\n\n{contents}"]
    parts += [section_markdown(section) for section in report.sections]
    return "\n\n".join(parts) + "\n"
