"""Tables for the workflow's HTML report: one self-contained page per table, with its title and caption.

Both packages write them (ctgen's metric tables, ctprep's labeller tables), so the page lives here, in the
package both import.
"""

from __future__ import annotations

import html

import pandas as pd

STYLE = ("<style>body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse} "
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left} th{background:#eee} "
         "caption{text-align:left;font-weight:bold;padding:4px 0}</style>")


def html_table(df: pd.DataFrame, title: str, caption: str) -> str:
    """``df`` as an HTML page: the title and the caption (its n, what it measures) above the table."""
    body = df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}", escape=True)
    body = body.replace('<table border="1" class="dataframe">',
                        f"<table><caption>{html.escape(title)}<br><small>{html.escape(caption)}</small></caption>", 1)
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'>{STYLE}</head><body>{body}</body></html>\n"
