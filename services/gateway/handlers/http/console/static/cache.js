import { api, empty, errorBox, h, page, pct, showError, usd } from "./console.js";

function card(label, value, id) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, value));
}

page(async (main, me) => {
  const monthStart = `${new Date().toISOString().slice(0, 8)}01`;
  const usage = await api(`/v1/usage?since=${monthStart}&group_by=model`);
  const t = usage.totals;
  main.append(h("h1", {}, "Cache"),
    h("p", { class: "sub" }, "Answers served from the exact cache (the same request) or the semantic cache (a paraphrase, when asked), and what they saved."),
    h("div", { class: "grid cards" },
      card("your team's hit rate (month)", pct(t.requests ? t.cache_hits / t.requests : null), "team-hit-rate"),
      card("cache hits", t.cache_hits, "team-hits"),
      card("saved", usd(t.saved_usd_nanos), "team-saved"),
      card("requests", t.requests, "team-requests")));

  const service = h("div", { class: "panel", id: "cache-service" });
  main.append(service);
  if (me.operator) {
    try {
      const s = await api("/v1/cache");
      service.append(h("h2", {}, "Cache service (every team, since it started)"),
        h("div", { class: "grid cards" },
          card("exact hit rate", pct(s.exact_hit_rate), "exact-hit-rate"),
          card("semantic hit rate", pct(s.semantic_hit_rate), "semantic-hit-rate"),
          card("lookups", s.lookups, "lookups"), card("entries", s.entries, "entries"),
          card("stores", s.stores, "stores")));
    } catch (err) { service.append(errorBox(err, "Cache service")); }
  } else {
    service.append(h("h2", {}, "Cache service"),
      h("p", { class: "muted" }, "Exact and semantic hit rates of the cache service count every team's lookups: an operator key (the admin team) reads them."));
  }

  const byModel = usage.data.filter((r) => r.cache_hits > 0);
  main.append(h("div", { class: "panel" }, h("h2", {}, "Hits by model (this month)"),
    byModel.length ? h("table", {}, h("thead", {}, h("tr", {}, ["model", "requests", "hits", "hit rate", "saved"].map((x) => h("th", {}, x)))),
      h("tbody", {}, byModel.map((r) => h("tr", {}, h("td", { class: "mono" }, r.model), h("td", {}, r.requests),
        h("td", {}, r.cache_hits), h("td", {}, pct(r.cache_hits / r.requests)), h("td", {}, usd(r.saved_usd_nanos))))))
      : empty("No cache hits yet", "Send the same prompt twice with temperature 0 from the playground.")));

  const model = h("input", { id: "inv-model", value: "sim-fast" });
  const prompt = h("textarea", { id: "inv-prompt", rows: "3" }, "Write a haiku about rivers.");
  const extra = h("textarea", { id: "inv-extra", rows: "2", placeholder: 'the other members as sent, e.g. {"temperature": 0}' });
  const result = h("div", { id: "inv-result" });
  const run = async (body) => {
    result.replaceChildren();
    try {
      const answer = await api("/v1/cache/invalidate", { method: "POST", body });
      result.replaceChildren(h("div", { class: "notice" }, answer.removed
        ? `Removed ${answer.removed} cached answer${answer.removed > 1 ? "s" : ""}.`
        : "Nothing was cached for that request."));
    } catch (err) { result.replaceChildren(errorBox(err, "Invalidate failed")); }
  };
  const form = h("form", { class: "panel" }, h("h2", {}, "Invalidate"),
    h("p", { class: "muted small" }, "Removes your team's cached answer to a request, as it was sent (same model, messages and parameters)."),
    h("label", { for: "inv-model" }, "Model"), model,
    h("label", { for: "inv-prompt" }, "User message"), prompt,
    h("label", { for: "inv-extra" }, "Other members (JSON)"), extra,
    h("div", { class: "row", style: "margin-top:12px" }, h("button", { type: "submit", id: "inv-submit" }, "Invalidate this answer"),
      me.operator ? h("button", { type: "button", class: "danger", id: "inv-all", onclick: () => {
        if (confirm("Empty the whole cache, for every team?")) run({ all: true });
      } }, "Empty the whole cache") : null),
    result);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let more = {};
    try { more = extra.value.trim() ? JSON.parse(extra.value) : {}; }
    catch (err) { showError(err, "Other members are not JSON"); return; }
    run({ request: { model: model.value, messages: [{ role: "user", content: prompt.value }], ...more } });
  });
  main.append(form);
});
