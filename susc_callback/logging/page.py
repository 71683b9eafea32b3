"""The HTML page of the reports and its embedded figures: one self-contained file, no
server, no network (figures are PNG data URIs, also written next to the page)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from matplotlib.figure import Figure


def figure_section(name: str, caption: str, figure: Figure, out_dir: Path) -> str:
    path = out_dir / "figures" / f"{name}.png"
    figure.savefig(path, dpi=110)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="{name}"><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }}
.tokens {{ font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.7; }}
.seq {{ margin: 0.3em 0; white-space: pre-wrap; }}
.label {{ color: #777; font-size: 11px; margin-right: 0.8em; }}
.tok {{ border-radius: 2px; }}
.tok.outlined {{ outline: 2px solid rgb(31,79,191); }}
button.cluster.active {{ background: rgb(31,79,191); color: white; }}
.key {{ padding: 0 0.3em; }} .neg {{ background: rgb(215,48,39); color: white; }}
.pos {{ background: rgb(26,152,80); color: white; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; }}
</style></head><body>
{body}
<script>{script}</script>
</body></html>
"""
