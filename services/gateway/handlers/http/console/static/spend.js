import { api, empty, h, page, usd } from "./console.js";

const DIMENSIONS = [["key", "key_id"], ["team", "team_id"], ["model", "model"], ["tag", "tag"]];

function isoDay(date) { return date.toISOString().slice(0, 10); }

function budgetBar(label, spent, budget, id) {
  if (!budget) {
    return h("div", { class: "budget", id },
      h("div", { class: "row" }, h("strong", {}, label), h("span", { class: "muted fit" }, `${usd(spent)} · no budget of its own`)));
  }
  const share = spent / budget;
  const tone = share >= 1 ? "bad" : share >= 0.8 ? "warn" : "";
  return h("div", { class: "budget", id, "data-share": share.toFixed(4) },
    h("div", { class: "row" }, h("strong", {}, label),
      h("span", { class: "fit" }, `${usd(spent)} of ${usd(budget)} · ${(share * 100).toFixed(1)}%`)),
    h("div", { class: "bar", title: "the line marks 80%" },
      h("div", { class: `fill ${tone}`, style: `width:${Math.min(100, share * 100)}%` }),
      h("div", { class: "mark", style: "left:80%" })));
}

function chart(rows, days) {
  const width = 720, height = 180, pad = 28;
  const byDay = new Map(rows.map((r) => [r.day, r.cost_usd_nanos]));
  const values = days.map((d) => byDay.get(d) || 0);
  const max = Math.max(1, ...values);
  const step = (width - pad * 2) / days.length;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("id", "spend-chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "Spend per day, last 30 days");
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text) el.textContent = text;
    svg.append(el);
    return el;
  };
  add("line", { x1: pad, x2: width - pad, y1: height - pad, y2: height - pad, stroke: "#cfd5de" });
  values.forEach((v, i) => {
    const barH = ((height - pad * 2) * v) / max;
    const rect = add("rect", { x: pad + i * step + 2, y: height - pad - barH, width: Math.max(1, step - 4),
      height: barH, rx: 2, fill: "#2f5bea" });
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${days[i]}: ${usd(v)}`;
    rect.append(title);
    if (i % 5 === 0 || i === values.length - 1) add("text", { x: pad + i * step, y: height - 8 }, days[i].slice(5));
  });
  add("text", { x: pad, y: 14 }, `max ${usd(max)}`);
  return svg;
}

function table(rows, field, label) {
  if (!rows.length) return empty(`No spend by ${label} yet`, "Requests made with this key's team show here.");
  return h("table", { "data-by": label },
    h("thead", {}, h("tr", {}, [label, "requests", "tokens in", "tokens out", "cost", "cache hits", "saved"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.map((r) => h("tr", {},
      h("td", { class: "mono" }, r[field] || (field === "tag" ? "(untagged)" : "–")), h("td", {}, r.requests),
      h("td", {}, r.input_tokens), h("td", {}, r.output_tokens), h("td", {}, usd(r.cost_usd_nanos)),
      h("td", {}, r.cache_hits), h("td", {}, usd(r.saved_usd_nanos))))));
}

page(async (main, session) => {
  const now = new Date();
  const today = isoDay(now);
  const monthStart = `${today.slice(0, 8)}01`;
  const since30 = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - 29));
  const days = Array.from({ length: 30 }, (_, i) => isoDay(new Date(since30.getTime() + i * 86400000)));
  const me = await api("/v1/me");
  const [dayKey, monthKey, byDay, ...groups] = await Promise.all([
    api(`/v1/usage?since=${today}&group_by=key`),
    api(`/v1/usage?since=${monthStart}&group_by=key`),
    api(`/v1/usage?since=${days[0]}&group_by=day`),
    ...DIMENSIONS.map(([d]) => api(`/v1/usage?since=${monthStart}&group_by=${d}`)),
  ]);
  const mine = (report) => report.data.filter((r) => r.key_id === me.key_id)
    .reduce((sum, r) => sum + r.cost_usd_nanos, 0);
  const b = me.budgets_usd_nanos;
  const totals = monthKey.totals;
  main.append(h("h1", {}, "Spend"),
    h("p", { class: "sub" }, `Team ${me.team_id || "(none)"} · UTC days and months · exact amounts from the ledger.`),
    h("div", { class: "grid cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, "today"), h("div", { class: "value", id: "spend-today" }, usd(dayKey.totals.cost_usd_nanos))),
      h("div", { class: "card" }, h("div", { class: "label" }, "this month"), h("div", { class: "value", id: "spend-month" }, usd(totals.cost_usd_nanos))),
      h("div", { class: "card" }, h("div", { class: "label" }, "requests this month"), h("div", { class: "value" }, totals.requests)),
      h("div", { class: "card" }, h("div", { class: "label" }, "saved by the cache"), h("div", { class: "value" }, usd(totals.saved_usd_nanos)))),
    h("div", { class: "panel", style: "margin-top:18px" }, h("h2", {}, "Budgets"),
      budgetBar("Team, today", dayKey.totals.cost_usd_nanos, b.team.day, "budget-team-day"),
      budgetBar("Team, this month", totals.cost_usd_nanos, b.team.month, "budget-team-month"),
      budgetBar("This key, today", mine(dayKey), b.key.day, "budget-key-day"),
      budgetBar("This key, this month", mine(monthKey), b.key.month, "budget-key-month"),
      h("p", { class: "muted small" }, "The line on each bar marks 80%, where the spend alert fires.")),
    h("div", { class: "panel" }, h("h2", {}, "Spend per day (last 30 days)"),
      byDay.data.length ? chart(byDay.data, days) : empty("No spend in the last 30 days", "Send a prompt from the playground to see it here.")),
    ...DIMENSIONS.map(([d, field], i) => h("div", { class: "panel" }, h("h2", {}, `This month by ${d}`), table(groups[i].data, field, d))));
});
