// nuclide dashboard: the fusion page's call graph as inline SVG (no library). Loaded before app.js.
// callGraphSvg(edges, groupOf): edges as GET /optimizer's "graph" gives them ({caller, callee, calls, fused,
// remote, sync, mean_ms}), groupOf maps a function to its group's index (its colour). Functions are laid out
// in columns, left to right along the calls (a column per step from a function nobody calls); a call back to
// an earlier column, or within one, curves below its boxes. Fused calls are solid lines, remote ones dashed.
"use strict";

const GRAPH_NS = "http://www.w3.org/2000/svg";
const GRAPH_NODE_W = 150, GRAPH_NODE_H = 34, GRAPH_COL_W = 320, GRAPH_ROW_H = 104, GRAPH_PAD = 24;
const GRAPH_COLOURS = ["#dbe7ff", "#dafbe1", "#fff1c2", "#fde2e4", "#eadcff", "#d4f4f4", "#ffe4cc", "#e6e9ef"];

function svgEl(tag, attrs, ...children) {
  const el = document.createElementNS(GRAPH_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) if (c !== "") el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// The column of each function: the longest chain of calls leading to it, calls that close a cycle left out.
function graphColumns(names, edges) {
  const out = new Map(names.map((n) => [n, []]));
  const incoming = new Set();
  for (const e of edges) {
    if (e.caller === e.callee) continue;
    out.get(e.caller).push(e.callee);
    incoming.add(e.callee);
  }
  const back = new Set();  // "caller\ncallee" of calls that go back up a chain (a cycle)
  const state = new Map();  // 1 on the current path, 2 done
  const visit = (n) => {
    state.set(n, 1);
    for (const m of out.get(n)) {
      if (state.get(m) === 1) back.add(`${n}\n${m}`);
      else if (!state.has(m)) visit(m);
    }
    state.set(n, 2);
  };
  for (const n of names.filter((n) => !incoming.has(n)).concat(names)) if (!state.has(n)) visit(n);
  const column = new Map();
  const depth = (n) => {
    if (!column.has(n)) {
      column.set(n, 0);  // a placeholder: the graph without back edges has no cycle, so it is never read early
      let d = 0;
      for (const e of edges) {
        if (e.callee === n && e.caller !== n && !back.has(`${e.caller}\n${n}`)) d = Math.max(d, depth(e.caller) + 1);
      }
      column.set(n, d);
    }
    return column.get(n);
  };
  names.forEach(depth);
  return column;
}

function callGraphSvg(edges, groupOf) {
  const names = [...new Set(edges.flatMap((e) => [e.caller, e.callee]))].sort();
  const column = graphColumns(names, edges);
  const rows = new Map();  // column -> names in it
  for (const n of names) rows.set(column.get(n), [...(rows.get(column.get(n)) || []), n]);
  const at = new Map();  // name -> {x, y} of its box's top left
  for (const [c, members] of rows) members.forEach((n, i) => at.set(n, {x: GRAPH_PAD + c * GRAPH_COL_W, y: GRAPH_PAD + i * GRAPH_ROW_H}));
  // room for the loops of self-calls on the right, and for the curves of calls back (or within a column) below
  const loops = edges.some((e) => e.caller === e.callee);
  const curves = edges.some((e) => e.caller !== e.callee && at.get(e.callee).x <= at.get(e.caller).x);
  const width = GRAPH_PAD * 2 + (Math.max(...rows.keys()) * GRAPH_COL_W) + GRAPH_NODE_W + (loops ? 90 : 0);
  const height = GRAPH_PAD * 2 + (Math.max(...[...rows.values()].map((m) => m.length)) - 1) * GRAPH_ROW_H
                 + GRAPH_NODE_H + (curves ? 70 : loops ? 30 : 20);

  const svg = svgEl("svg", {viewBox: `0 0 ${width} ${height}`, width, height, class: "callgraph", role: "img",
                            "aria-label": "call graph"});
  svg.append(svgEl("defs", {},
    svgEl("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse"},
      svgEl("path", {d: "M0,0 L10,5 L0,10 z", class: "arrowhead"}))));

  for (const e of edges) {
    const a = at.get(e.caller), b = at.get(e.callee);
    let d, lx, ly, oneLine = false, anchor = "middle";
    if (e.caller === e.callee) {  // a function calling itself: a loop on its right
      const x = a.x + GRAPH_NODE_W, y = a.y + GRAPH_NODE_H / 2;
      d = `M${x},${y - 8} C${x + 50},${y - 40} ${x + 50},${y + 40} ${x},${y + 8}`;
      lx = x + 36; ly = y - 26; oneLine = true; anchor = "start";  // above the loop
    } else if (b.x > a.x) {  // forward: right side to left side
      const x1 = a.x + GRAPH_NODE_W, y1 = a.y + GRAPH_NODE_H / 2, x2 = b.x, y2 = b.y + GRAPH_NODE_H / 2;
      const bend = (x2 - x1) / 2;
      d = `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`;
      lx = (x1 + x2) / 2; ly = (y1 + y2) / 2 - 8;  // the count above the line, the split below it
    } else {  // back or within a column: bottom to bottom, curving below
      const x1 = a.x + GRAPH_NODE_W / 2 + 10, y1 = a.y + GRAPH_NODE_H, x2 = b.x + GRAPH_NODE_W / 2 - 10, y2 = b.y + GRAPH_NODE_H;
      const low = Math.max(y1, y2) + 46;
      d = `M${x1},${y1} C${x1},${low} ${x2},${low} ${x2},${y2}`;
      lx = (x1 + x2) / 2; ly = low - 8; oneLine = true;  // a second line would reach the boxes below
    }
    const kind = e.fused === e.calls ? "fused" : e.remote === e.calls ? "remote" : "mixed";
    const count = `${e.calls} call${e.calls === 1 ? "" : "s"}`;
    const split = kind === "mixed" ? `${e.fused} fused · ${e.remote} remote` : kind;
    const mean = e.mean_ms === null || e.mean_ms === undefined ? "" : `, mean ${e.mean_ms} ms`;
    svg.append(svgEl("g", {class: `edge ${kind}`, "data-edge": `${e.caller}->${e.callee}`, "data-calls": e.calls,
                           "data-fused": e.fused, "data-remote": e.remote},
      svgEl("title", {}, `${e.caller} → ${e.callee}: ${e.calls} calls (${e.fused} fused, ${e.remote} remote,`
                         + ` ${e.sync} synchronous${mean})`),
      svgEl("path", {d, "marker-end": "url(#arrow)"}),
      svgEl("text", {x: lx, y: ly, "text-anchor": anchor, class: "count"}, count,
            oneLine ? svgEl("tspan", {class: "split"}, ` · ${split}`) : ""),
      oneLine ? "" : svgEl("text", {x: lx, y: ly + 27, "text-anchor": "middle"}, split)));
  }
  for (const n of names) {
    const {x, y} = at.get(n);
    const group = groupOf.has(n) ? groupOf.get(n) : -1;
    svg.append(svgEl("g", {class: "node", "data-node": n},
      svgEl("title", {}, group >= 0 ? `${n} (group ${group + 1})` : `${n} (not deployed now)`),
      svgEl("rect", {x, y, rx: 6, width: GRAPH_NODE_W, height: GRAPH_NODE_H,
                     fill: group >= 0 ? GRAPH_COLOURS[group % GRAPH_COLOURS.length] : "#f3f4f6"}),
      svgEl("text", {x: x + GRAPH_NODE_W / 2, y: y + GRAPH_NODE_H / 2 + 4, "text-anchor": "middle"},
            n.length > 20 ? n.slice(0, 19) + "…" : n)));
  }
  return svg;
}
