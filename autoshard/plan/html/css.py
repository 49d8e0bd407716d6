"""The plan view's colours and style sheet (inline: the page fetches nothing)."""

AXIS_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2",
                "#edc948", "#9c755f")

COST_COLOURS = {"compute": "#4e79a7", "communication": "#f28e2b", "resharding": "#e15759"}

CSS = """
.autoshard-plan{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 font-size:13px;color:#222;line-height:1.35;max-width:1150px}
.autoshard-plan h3{font-size:16px;margin:4px 0 8px}
.autoshard-plan h4{font-size:14px;margin:12px 0 4px}
.autoshard-plan code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.autoshard-plan table{border-collapse:collapse;margin:4px 0}
.autoshard-plan td,.autoshard-plan th{padding:2px 8px;text-align:left;vertical-align:top;
 border-bottom:1px solid #eee}
.autoshard-plan th{font-weight:600;border-bottom:1px solid #ccc}
.autoshard-plan td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.autoshard-plan details{margin:2px 0 2px 6px;padding-left:8px;border-left:2px solid #e3e3e3}
.autoshard-plan summary{cursor:pointer;font-weight:500}
.autoshard-plan summary .as-n{color:#888;font-weight:400}
.autoshard-plan .as-grid{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 6px}
.autoshard-plan .as-t{border:1px solid #e3e3e3;border-radius:4px;padding:4px;background:#fff}
.autoshard-plan .as-name{font-weight:500;max-width:190px;overflow-wrap:anywhere}
.autoshard-plan .as-spec{color:#555}
.autoshard-plan .as-legend span.sw{display:inline-block;width:10px;height:10px;border-radius:2px;
 margin:0 4px 0 10px;vertical-align:-1px}
.autoshard-plan .as-warn{color:#a33}
.autoshard-plan .as-muted{color:#888}
"""
