import { api, badge, empty, h, page } from "./console.js";

function rows(node, depth, total, out) {
  const left = total ? (node.start_ms / total) * 100 : 0;
  const width = total ? Math.max(0.3, (node.duration_ms / total) * 100) : 100;
  const attrs = Object.entries(node.attributes || {}).map(([k, v]) => `${k}=${v}`).join("  ");
  out.push(h("div", { class: `node${node.status === "ERROR" ? " error" : ""}`, "data-span": node.span_id },
    h("div", { style: `padding-left:${depth * 16}px` },
      h("strong", {}, node.name), " ", h("span", { class: "muted" }, node.service),
      h("div", { class: "muted small", title: attrs }, `${node.kind.toLowerCase()} · ${node.duration_ms.toFixed(2)} ms`)),
    h("div", {}, h("div", { class: "span-bar" }, h("div", { style: `left:${left}%;width:${width}%` })),
      h("div", { class: "muted small" }, attrs))));
  for (const child of node.children) rows(child, depth + 1, total, out);
  return out;
}

page(async (main) => {
  const id = new URLSearchParams(location.search).get("id") || "";
  main.append(h("h1", {}, "Trace"), h("p", { class: "sub mono" }, id || "no trace id"));
  if (!id) {
    main.append(h("div", { class: "panel" }, empty("No trace chosen", "Open a trace from the playground's answer.")));
    return;
  }
  const trace = await api(`/v1/traces/${encodeURIComponent(id)}`);
  main.append(
    h("div", { class: "grid cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, "duration"), h("div", { class: "value" }, `${trace.duration_ms.toFixed(1)} ms`)),
      h("div", { class: "card" }, h("div", { class: "label" }, "spans"), h("div", { class: "value", id: "span-count" }, trace.span_count)),
      h("div", { class: "card" }, h("div", { class: "label" }, "services"), h("div", {}, trace.services.map((s) => badge(s)), ""))),
    h("div", { class: "panel tree", id: "trace-tree", style: "margin-top:18px" },
      trace.spans.flatMap((root) => rows(root, 0, trace.duration_ms, []))));
});
