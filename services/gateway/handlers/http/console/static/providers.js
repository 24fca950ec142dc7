import { api, badge, empty, h, ms, page, pct } from "./console.js";

page(async (main) => {
  const data = await api("/v1/providers");
  main.append(h("h1", {}, "Providers"),
    h("p", { class: "sub" }, `Routes you may use, each a chain of deployments tried in order; breakers as every worker shares them; calls of the last ${Math.round(data.calls_window_seconds / 60)} minutes.`));
  if (data.calls_source === "none") {
    main.append(h("div", { class: "notice" }, "Spans go to an OTLP endpoint: recent calls are in your tracing backend, not here."));
  }
  if (!data.data.length) {
    main.append(h("div", { class: "panel" }, empty("No routes", "This key may not use any model of the catalogue.")));
    return;
  }
  for (const route of data.data) {
    const rows = [];
    route.steps.forEach((step, i) => {
      for (const d of step.deployments) {
        const r = d.recent;
        rows.push(h("tr", { "data-deployment": d.name },
          h("td", {}, i + 1), h("td", { class: "mono" }, d.name), h("td", {}, d.provider),
          h("td", { class: "mono" }, d.upstream_model),
          h("td", {}, badge(d.breaker.state), d.breaker.reason ? h("div", { class: "muted small" },
            `${d.breaker.reason}${d.breaker.seconds_left ? ` · ${d.breaker.seconds_left}s left` : ""}`) : null),
          h("td", {}, r ? r.calls : 0), h("td", {}, r ? pct(r.error_rate) : "–"),
          h("td", {}, r ? `${ms(r.latency_ms_p50)} / ${ms(r.latency_ms_p95)}` : "–")));
      }
    });
    main.append(h("div", { class: "panel", "data-route": route.route },
      h("div", { class: "row" }, h("h2", {}, route.route),
        h("span", { class: "fit muted small" }, [route.deadline_seconds ? `deadline ${route.deadline_seconds}s` : "",
          route.last_resort ? "last resort" : "", route.deprecated ? "deprecated" : ""].filter(Boolean).join(" · "))),
      route.description ? h("p", { class: "muted small" }, route.description) : null,
      h("table", {}, h("thead", {}, h("tr", {}, ["step", "deployment", "provider", "upstream model", "breaker", "calls", "errors", "p50 / p95"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows))));
  }
});
