"""The routing analysis and the calibration frontier as one self-contained
HTML page (`report.html`): no server, no network, every figure and datum
inline. Sections: the accuracy-compute curve with its frontier (when the
model is calibrated), the BPR-vs-vanilla capacity sweep, per-layer expert
usage, token maps to hover (each patch: kept or dropped, priority, top-1
expert), expert load and reliance. The PNGs stay for papers."""
from __future__ import annotations

import base64
import html
import json
import os
from typing import Any, Optional

import numpy as np

from ..storage.calibration import Calibration
from ..utils.io import atomic_write_text

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}
.maps{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:8px}
.maps figure{margin:0}.maps figcaption{font-size:.75em}canvas{width:120px;height:120px;image-rendering:pixelated}
#tip{position:fixed;background:#fff;border:1px solid #888;padding:4px 6px;font-size:.8em;display:none;
pointer-events:none}
"""

# Draws every token map from the embedded JSON; hovering a patch shows its routing.
_SCRIPT = """const D=JSON.parse(document.getElementById('token-data').textContent);
const tip=document.getElementById('tip');const pal=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd',
'#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf'];
function cell(kind,v,pmax){if(kind==='expert')return pal[v%10];if(kind==='priority'){const a=v/pmax;
return `rgba(180,40,120,${0.15+0.75*a})`;}return v>0?'rgba(30,140,60,0.65)':'rgba(200,200,200,0.75)';}
const root=document.getElementById('maps');
D.images.forEach((img,i)=>{const sel=document.createElement('select');
D.layers.forEach(l=>{const o=document.createElement('option');o.textContent=l;o.value=l;sel.appendChild(o);});
sel.value=D.layers[0];
const box=document.createElement('div');box.className='maps';const head=document.createElement('h3');
head.textContent='image '+D.picks[i]+' — layer ';head.appendChild(sel);root.appendChild(head);root.appendChild(box);
function draw(){box.innerHTML='';const L=D.maps[sel.value];D.kinds.forEach(([kind,label])=>{
const g=L[kind][i];const gh=g.length,gw=g[0].length;const c=document.createElement('canvas');
const s=12;c.width=gw*s;c.height=gh*s;const x=c.getContext('2d');const ih=img.length,iw=img[0].length;
for(let r=0;r<ih;r++)for(let q=0;q<iw;q++){const v=Math.round(255*img[r][q]);x.fillStyle=`rgb(${v},${v},${v})`;
x.fillRect(q*gw*s/iw,r*gh*s/ih,gw*s/iw+0.5,gh*s/ih+0.5);}
for(let r=0;r<gh;r++)for(let q=0;q<gw;q++){x.fillStyle=cell(kind,g[r][q],D.priority_max);x.fillRect(q*s,r*s,s,s);}
c.onmousemove=e=>{const b=c.getBoundingClientRect();const q=Math.floor((e.clientX-b.left)/b.width*gw),
r=Math.floor((e.clientY-b.top)/b.height*gh);if(r<0||q<0||r>=gh||q>=gw)return;
tip.style.display='block';tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px';
tip.textContent=`patch (${r}, ${q}): vanilla ${L.vanilla[i][r][q]>0?'kept':'dropped'}, BPR `+
`${L.bpr[i][r][q]>0?'kept':'dropped'}, priority ${L.priority[i][r][q].toFixed(3)}, expert ${L.expert[i][r][q]}`;};
c.onmouseleave=()=>{tip.style.display='none';};const f=document.createElement('figure');f.appendChild(c);
const cap=document.createElement('figcaption');cap.textContent=label;f.appendChild(cap);box.appendChild(f);});}
sel.onchange=draw;draw();});
"""


def _png(path: str) -> str:
    if not os.path.exists(path):
        return "<p>(figure not written)</p>"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def frontier_svg(cal: Calibration, width: int = 640, height: int = 360) -> str:
    """Top-1 against GFLOPs per image: every measured point, the frontier as a
    line; hover a point for its setting."""
    pts = cal.points
    xs = [p.flops_per_image / 1e9 for p in pts]
    ys = [p.top1 for p in pts]
    x0, x1 = 0.0, max(xs) * 1.05
    y0, y1 = max(0.0, min(ys) - 0.02), min(1.0, max(ys) + 0.02)
    pad = 48

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0 or 1) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0 or 1) * (height - 2 * pad)
    front = cal.frontier()
    line = " ".join(f"{sx(p.flops_per_image / 1e9):.1f},{sy(p.top1):.1f}" for p in front)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
           f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle" font-size="12">GFLOPs per image</text>',
           f'<text x="14" y="{height / 2}" font-size="12" transform="rotate(-90 14 {height / 2})" '
           'text-anchor="middle">top-1</text>',
           f'<polyline points="{line}" fill="none" stroke="#d62728" stroke-width="2"/>']
    for v in np.linspace(y0, y1, 5):
        out.append(f'<text x="{pad - 4}" y="{sy(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.2f}</text>')
    for v in np.linspace(x0, x1, 5):
        out.append(f'<text x="{sx(v):.1f}" y="{height - pad + 14}" font-size="10" '
                   f'text-anchor="middle">{v:.4f}</text>')
    for p in pts:
        colour = "#d62728" if p.frontier else "#1f77b4"
        out.append(f'<circle cx="{sx(p.flops_per_image / 1e9):.1f}" cy="{sy(p.top1):.1f}" r="4" fill="{colour}">'
                   f'<title>{html.escape(p.describe())}: top-1 {p.top1:.4f}, '
                   f'{p.flops_per_image / 1e6:.2f} MFLOPs / image</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def token_data(images: np.ndarray, maps: dict[str, dict[str, np.ndarray]], picks: list[int]) -> dict[str, Any]:
    """The token maps as JSON-able lists (images scaled to [0, 1], rounded)."""
    return {"picks": picks, "layers": list(maps),
            "kinds": [["vanilla", "vanilla: kept"], ["bpr", "BPR: kept"], ["priority", "BPR priority"],
                      ["expert", "top-1 expert"]],
            "priority_max": float(max(m["priority"].max() for m in maps.values()) or 1.0),
            "images": np.round(images, 3).tolist(),
            "maps": {n: {k: (np.round(v, 4) if k == "priority" else v.astype(int)).tolist() for k, v in m.items()}
                     for n, m in maps.items()}}


def write_html(res: dict[str, Any], out_dir: str, tokens: Optional[dict[str, Any]] = None,
               calibration: Optional[Calibration] = None) -> str:
    """Writes out_dir/report.html; returns its path."""
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Routing analysis</title>",
             f"<style>{_STYLE}</style></head><body><h1>Routing analysis</h1>",
             f"<p>{res['num_test_images']} test images, E={res['num_experts']}, trained K={res['trained_k']}, "
             f"routing groups of {res['group_size']} tokens.</p>", "<h2>Accuracy against compute</h2>"]
    if calibration is not None:
        rows = [[p.describe(), f"{p.top1:.4f}", f"{p.flops_per_image / 1e6:.2f}",
                 f"{p.flops_per_image / calibration.full.flops_per_image:.0%}"] for p in calibration.frontier()]
        parts += [frontier_svg(calibration),
                  "<p>Red: the Pareto frontier <code>model.at_budget(...)</code> chooses from.</p>",
                  _table(rows, ["routing", "top-1", "MFLOPs / image", "of full"])]
    else:
        parts.append("<p>This model is not calibrated: run <code>vmoe calibrate MODEL_DIR</code> for the curve.</p>")
    sweep = [[r["capacity_factor"], r["num_selected_experts"], "BPR" if r["batch_priority"] else "vanilla",
              f"{r['test_accuracy']:.4f}"] for r in res["capacity_sweep"]]
    parts += ["<h2>BPR against vanilla routing, by capacity</h2>", _png(os.path.join(out_dir, "capacity_sweep.png")),
              _table(sweep, ["C", "K", "routing", "top-1"]),
              "<h2>Expert usage by class</h2>", _png(os.path.join(out_dir, "expert_class_heatmaps.png")),
              "<h2>Token maps</h2><p>Hover a patch for its routing; choose the layer per image.</p>"]
    if tokens is not None:
        data = json.dumps(tokens).replace("</", "<\\/")
        parts += ["<div id='maps'></div><div id='tip'></div>",
                  f"<script type='application/json' id='token-data'>{data}</script>", f"<script>{_SCRIPT}</script>"]
    parts += [_png(os.path.join(out_dir, "token_maps.png")),
              "<h2>Expert load</h2>", _png(os.path.join(out_dir, "expert_load.png")),
              "<h2>Reliance on the experts</h2>", _png(os.path.join(out_dir, "reliance.png")),
              _table([[n, f"{v:.4f}"] for n, v in res["ablation"].items()], ["setting", "top-1"])]
    parts += _attack_section(out_dir) + ["</body></html>"]
    path = os.path.join(out_dir, "report.html")
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def _attack_section(out_dir: str) -> list[str]:
    """Adversarial robustness, when `vmoe attack --out` wrote attack.json here."""
    path = os.path.join(out_dir, "attack.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        results = json.load(f)
    rows = [[label, f"{r['eps'] * 127.5:g}", f"{r['clean_top1']:.4f}", f"{r['adversarial_top1']:.4f}",
             f"{r['prediction_changes']:.4f}",
             ", ".join(f"{n} {v:.3f}" for n, v in r["routing_changes"].items()) or "-"]
            for label, model_rows in results.items() for r in model_rows]
    return ["<h2>Adversarial robustness (PGD)</h2>", _png(os.path.join(out_dir, "attack.png")),
            _table(rows, ["model", "eps (grey levels)", "clean top-1", "attacked top-1", "predictions changed",
                          "routing change per layer"])]
