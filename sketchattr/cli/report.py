"""Reports of top-k attributions: each query next to its top proponents and opponents.

* :func:`write_html`: one self-contained HTML file (images as base64 PNG thumbnails via Pillow,
  texts as text, scores and labels under each example).
* :func:`write_png`: a matplotlib grid, one row per query: the query, then its proponents,
  then its opponents (text examples drawn as wrapped text).

Both take :class:`QueryReport` s, whose cells carry a :class:`~sketchattr.data.local_files.Preview`.
Pillow and matplotlib are optional (the ``images`` / ``plots`` extras) and imported here only.
"""
from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sketchattr.data.local_files import Preview

__all__ = ["Cell", "QueryReport", "write_html", "write_png"]

THUMB = 96  # thumbnail side in pixels
TEXT_CHARS = 400  # characters of a text example shown


@dataclass
class Cell:
    """One example: its dataset ``index``, ``score`` (None for the query) and ``preview``."""

    index: int
    preview: Preview
    score: float | None = None


@dataclass
class QueryReport:
    """A query and its top examples, best first (``proponents`` highest, ``opponents`` lowest score)."""

    query: Cell
    proponents: list[Cell] = field(default_factory=list)
    opponents: list[Cell] = field(default_factory=list)


def _image(preview: Preview) -> Any:
    """The preview's picture as a PIL RGB image, or None (no picture, or no Pillow)."""
    if preview.image is None and preview.image_path is None:
        return None
    try:
        from PIL import Image
    except ImportError:
        return None
    if preview.image is not None:
        return Image.fromarray(np.ascontiguousarray(preview.image.astype(np.uint8))).convert("RGB")
    with Image.open(preview.image_path) as im:
        return im.convert("RGB")


def _thumbnail(preview: Preview) -> Any:
    """A PIL image about THUMB pixels on its longer side (small images enlarged, pixels kept sharp)."""
    from PIL import Image

    im = _image(preview)
    if im is None:
        return None
    w, h = im.size
    scale = THUMB / max(w, h)
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST if scale > 1 else Image.BILINEAR)


def _text(preview: Preview) -> str:
    if preview.text is not None:
        return preview.text
    if preview.image_path is not None:
        return Path(preview.image_path).name
    return ""


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}
.cell{width:130px;font-size:12px}.cell img{display:block;margin-bottom:3px;image-rendering:pixelated}
.text{white-space:pre-wrap;max-height:9em;overflow:hidden;font-size:12px;background:#f6f6f6;padding:3px}
.q{background:#eef3fb}.pro .s{color:#0a7d28}.opp .s{color:#b3261e}th{text-align:left;font-size:13px;padding:6px}
.sep{border-left:2px solid #999}
"""


def _cell_html(cell: Cell, cls: str) -> str:
    p = cell.preview
    parts = []
    thumb = None
    if p.image is not None or p.image_path is not None:
        thumb = _thumbnail(p) if _pillow() else None
    if thumb is not None:
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        parts.append(f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="#{cell.index}">')
    text = _text(p)
    if text and (thumb is None or p.text is not None):
        short = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + " …"
        parts.append(f'<div class="text" title="{html.escape(text[:2000])}">{html.escape(short)}</div>')
    head = f"#{cell.index}" + (f" · {html.escape(str(p.label))}" if p.label is not None else "")
    parts.append(f"<div>{head}</div>")
    if cell.score is not None:
        parts.append(f'<div class="s">{cell.score:+.4g}</div>')
    return f'<td class="cell {cls}">{"".join(parts)}</td>'


def _pillow() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def write_html(path: "str | Path", reports: Sequence[QueryReport], title: str = "sketchattr attributions",
               subtitle: str = "") -> Path:
    """Write the self-contained HTML report; returns its path."""
    path = Path(path)
    k_pro = max((len(r.proponents) for r in reports), default=0)
    k_opp = max((len(r.opponents) for r in reports), default=0)
    head = "<tr><th>query</th>" + (f'<th colspan="{k_pro}">proponents (highest score first; positive = helped the query)</th>' if k_pro else "")
    head += (f'<th colspan="{k_opp}" class="sep">opponents (lowest score first; negative = hurt the query)</th>' if k_opp else "") + "</tr>"
    rows = []
    for r in reports:
        cells = [_cell_html(r.query, "q")] + [_cell_html(c, "pro") for c in r.proponents]
        opp = [_cell_html(c, "opp") for c in r.opponents]
        if opp:
            opp[0] = opp[0].replace('<td class="cell', '<td class="sep cell', 1)
        rows.append("<tr>" + "".join(cells + opp) + "</tr>")
    note = ("Score = predicted change of the query's measurement when the training example is up-weighted "
            "(positive: it helps the query).")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head>"
           f"<body><h2>{html.escape(title)}</h2><p>{html.escape(subtitle)}</p><p>{note}</p>"
           f"<table>{head}{''.join(rows)}</table></body></html>")
    path.write_text(doc, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- PNG
def write_png(path: "str | Path", reports: Sequence[QueryReport], title: str = "sketchattr attributions",
              k: int = 4) -> Path:
    """Write a PNG grid (at most ``k`` proponents and ``k`` opponents per query); needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the PNG report needs matplotlib: pip install 'sketchattr[plots]' (or use --report html)") from exc
    path = Path(path)
    k_pro = min(k, max((len(r.proponents) for r in reports), default=0))
    k_opp = min(k, max((len(r.opponents) for r in reports), default=0))
    ncols, nrows = 1 + k_pro + k_opp, max(len(reports), 1)
    fig = Figure(figsize=(1.9 * ncols, 2.1 * nrows + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for row, r in zip(axes, reports):
        cells = [(r.query, "query", "#1f4e9c")] + [(c, "+", "#0a7d28") for c in r.proponents[:k_pro]]
        cells += [(None, "", "")] * (k_pro - min(k_pro, len(r.proponents)))
        cells += [(c, "−", "#b3261e") for c in r.opponents[:k_opp]]
        for ax in row[len(cells):]:
            ax.axis("off")
        for ax, (cell, kind, color) in zip(row, cells):
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                continue
            for side in ax.spines.values():
                side.set_edgecolor(color)
                side.set_linewidth(2 if kind == "query" else 1)
            im = _image(cell.preview)
            if im is not None:
                ax.imshow(np.asarray(im), interpolation="nearest")
            else:
                text = _text(cell.preview)[:160]
                ax.text(0.03, 0.97, textwrap.fill(text, 22), va="top", ha="left", fontsize=6.5, transform=ax.transAxes, wrap=True)
            label = f" · {cell.preview.label}" if cell.preview.label is not None else ""
            score = f"\n{cell.score:+.3g}" if cell.score is not None else ""
            ax.set_title(f"{'query ' if kind == 'query' else ''}#{cell.index}{label}{score}", fontsize=7, color=color)
    fig.suptitle(f"{title}: query | proponents (+) | opponents (−)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
