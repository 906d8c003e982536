// Draws the prompt page's layered graph with Cytoscape.js (vendored). Positions come from the
// server (rows = layers, columns = token positions), so the drawing is the same on every load.
(function () {
  const data = JSON.parse(document.getElementById("graph-data").textContent);
  const elements = [];
  for (const n of data.nodes) {
    elements.push({group: "nodes", data: {id: n.id, label: n.id, ref: n.ref, kind: n.kind, linkable: n.linkable},
                   position: {x: n.x, y: n.y}});
  }
  for (const t of data.tokens) {  // column heads: the token at each position drawn
    elements.push({group: "nodes", classes: "token", data: {id: t.id, label: t.label, kind: "token", linkable: false},
                   position: {x: t.x, y: t.y}, selectable: false, grabbable: false});
  }
  for (const e of data.edges) {
    elements.push({group: "edges", data: {id: e.id, source: e.source, target: e.target, weight: e.weight,
                                          width: e.width, sign: e.sign}});
  }
  const kindColour = {attn: "#6b46c1", resid: "#2f855a", error: "#a0aec0", bias: "#cbd5e0", emb: "#dd6b20",
                      pos: "#ed8936", mlp: "#718096", attn_out: "#805ad5", rest: "#e2e8f0"};
  window.cy = cytoscape({
    container: document.getElementById("graph"),
    elements: elements,
    layout: {name: "preset", fit: true, padding: 30},
    wheelSensitivity: 0.3,
    maxZoom: 1.6,  // a graph of a few nodes is not blown up to fill the box
    style: [
      {selector: "node", style: {"label": "data(label)", "font-size": 9, "width": 14, "height": 14,
                                 "text-valign": "bottom", "text-margin-y": 3,
                                 "background-color": (n) => kindColour[n.data("kind")] || "#4a5568"}},
      {selector: "node.token", style: {"shape": "round-rectangle", "background-opacity": 0, "font-size": 11,
                                       "text-valign": "center", "text-margin-y": 0, "color": "#2d3748", "width": 80}},
      {selector: "edge", style: {"width": "data(width)", "curve-style": "bezier", "target-arrow-shape": "triangle",
                                 "arrow-scale": 0.6, "opacity": 0.75}},
      {selector: "edge[sign = 'pos']", style: {"line-color": "#2b6cb0", "target-arrow-color": "#2b6cb0"}},
      {selector: "edge[sign = 'neg']", style: {"line-color": "#c53030", "target-arrow-color": "#c53030"}},
    ],
  });
  window.cy.on("tap", "node", (evt) => {
    const n = evt.target;
    if (n.data("linkable")) window.location.href = "/view/feature/" + encodeURIComponent(n.data("ref"));
  });
  window.cy.on("mouseover", "edge", (evt) => evt.target.style("label", String(evt.target.data("weight"))));
  window.cy.on("mouseout", "edge", (evt) => evt.target.style("label", ""));
})();
