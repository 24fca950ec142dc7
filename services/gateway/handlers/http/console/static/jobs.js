import { api, badge, empty, errorBox, h, page, showError, usd, when } from "./console.js";

page(async (main) => {
  const prompt = h("textarea", { id: "job-prompt", rows: "3" }, "Summarise the plot of Hamlet in three lines.");
  const model = h("select", { id: "job-model" });
  const extra = h("textarea", { id: "job-extra", rows: "2", placeholder: 'optional: more request members as JSON' });
  const submit = h("button", { type: "submit", id: "job-submit" }, "Submit job");
  const list = h("div", { id: "job-list" });
  const detail = h("div", { class: "panel", id: "job-detail" }, empty("No job selected", "Pick a job to see its progress and events."));
  let selected = null;
  let events = null;

  const models = await api("/v1/models");
  model.append(...models.data.map((m) => h("option", { value: m.id }, m.id)));
  if (models.data.some((m) => m.id === "sim-fast")) model.value = "sim-fast";

  async function refresh() {
    const jobs = await api("/v1/jobs?limit=50");
    if (!jobs.data.length) {
      list.replaceChildren(empty("No jobs yet", "Submit one above: it runs in the batch class and reports here."));
      return;
    }
    list.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["job", "status", "model", "progress", "created", "cost"].map((t) => h("th", {}, t)))),
      h("tbody", {}, jobs.data.map((job) => h("tr", {
        class: `clickable${job.id === selected ? " selected" : ""}`, "data-job": job.id,
        onclick: () => select(job.id) },
        h("td", { class: "mono" }, job.id), h("td", {}, badge(job.status)), h("td", {}, job.model),
        h("td", {}, `${job.progress.tokens} tok${job.progress.fraction != null ? ` · ${Math.round(job.progress.fraction * 100)}%` : ""}`),
        h("td", {}, when(job.created_at)),
        h("td", {}, job.cost_usd != null ? usd(Math.round(job.cost_usd * 1e9)) : "–"))))));
  }

  function render(job, log) {
    const terminal = ["completed", "failed", "cancelled"].includes(job.status);
    const cancel = h("button", { class: "danger small", id: "job-cancel", disabled: terminal || job.cancel_requested,
      onclick: async () => {
        try { render(await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }), log); await refresh(); }
        catch (err) { showError(err, "Cancel failed"); }
      } }, terminal ? "Ended" : job.cancel_requested ? "Cancel requested" : "Cancel");
    detail.replaceChildren(
      h("div", { class: "row" }, h("h2", {}, "Job ", h("span", { class: "mono" }, job.id)), cancel),
      h("dl", { class: "kv" },
        h("dt", {}, "status"), h("dd", { id: "job-status" }, badge(job.status)),
        h("dt", {}, "progress"), h("dd", {}, `${job.progress.tokens} tokens` +
          (job.progress.max_tokens ? ` of ${job.progress.max_tokens}` : "")),
        h("dt", {}, "attempts"), h("dd", {}, job.attempts),
        h("dt", {}, "started / finished"), h("dd", {}, `${when(job.started_at)} / ${when(job.finished_at)}`),
        h("dt", {}, "trace"), h("dd", {}, job.trace_id ? h("a", { href: `/console/trace?id=${job.trace_id}` }, job.trace_id) : "–"),
        job.error ? [h("dt", {}, "error"), h("dd", {}, h("code", {}, job.error.code || ""), " ", job.error.detail || "")] : null),
      h("h2", { style: "margin-top:14px" }, "Events"),
      h("div", { class: "output", id: "job-events", style: "min-height:80px" }, log.join("\n")));
  }

  async function follow(id) {
    // GET /v1/jobs/{id}/events: status and token events until the job ends.
    if (events) events.abort();
    events = new AbortController();
    const log = [];
    const response = await fetch(`/v1/jobs/${id}/events`, {
      headers: { Authorization: `Bearer ${sessionStorage.getItem("sluice.console.key")}` }, signal: events.signal });
    if (!response.ok) return;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let job = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const type = (block.match(/^event: ?(.*)$/m) || [])[1] || "message";
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        const parsed = JSON.parse(data);
        if (type === "status") { job = parsed; log.push(`status  ${parsed.status}`); }
        else if (type === "token") { const last = log.at(-1) || ""; if (last.startsWith("tokens  ")) log[log.length - 1] = last + (parsed.text ?? parsed.content ?? ""); else log.push(`tokens  ${parsed.text ?? parsed.content ?? ""}`); }
        else log.push(`${type}  ${data.slice(0, 200)}`);
      }
      if (job && selected === id) render(job, log);
    }
    if (selected === id) await refresh();
  }

  async function select(id) {
    selected = id;
    try {
      render(await api(`/v1/jobs/${id}`), []);
      await refresh();
      follow(id).catch((err) => { if (err.name !== "AbortError") showError(err, "Events stopped"); });
    } catch (err) { detail.replaceChildren(errorBox(err, "Could not read the job")); }
  }

  const form = h("form", { class: "panel" }, h("h2", {}, "Submit a job"),
    h("div", { class: "row" }, h("div", {}, h("label", { for: "job-model" }, "Model"), model)),
    h("label", { for: "job-prompt" }, "Prompt"), prompt,
    h("label", { for: "job-extra" }, "Extra request members (JSON)"), extra,
    h("div", { class: "row", style: "margin-top:12px" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const request = { model: model.value, messages: [{ role: "user", content: prompt.value }],
        ...(extra.value.trim() ? JSON.parse(extra.value) : {}) };
      const job = await api("/v1/jobs", { method: "POST", body: { request } });
      await select(job.id);
    } catch (err) { showError(err, "Submit failed"); }
    finally { submit.disabled = false; }
  });

  main.append(h("h1", {}, "Jobs"),
    h("p", { class: "sub" }, "Chat completions run in the background: their status, progress and events, and a cancel."),
    h("div", { class: "grid two" }, form, detail),
    h("div", { class: "panel" }, h("div", { class: "row" }, h("h2", {}, "Your team's jobs"),
      h("button", { class: "ghost small", id: "job-refresh", onclick: () => refresh().catch((e) => showError(e)) }, "Refresh")), list));
  await refresh();
});
