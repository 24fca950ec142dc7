import { ApiError, api, errorBox, h, ms, page, readJson, session, traceIdOf, usd } from "./console.js";

// Reads an SSE body: calls onEvent(data) for each "data:" line, onBytes() at the first
// bytes (the gateway's first SSE byte, as this browser receives it).
async function readSse(response, onEvent, onBytes) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let first = true;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (first) { onBytes(); first = false; }
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data && data !== "[DONE]") onEvent(JSON.parse(data));
    }
  }
}

function stat(key, id) {
  return h("div", { class: "stat" }, h("div", { class: "k" }, key), h("div", { class: "v", id }, "–"));
}

page(async (main) => {
  const models = await api("/v1/models");
  const modelSelect = h("select", { id: "model" },
    models.data.map((m) => h("option", { value: m.id }, m.id)));
  const preferred = models.data.find((m) => m.id === "sim-fast");
  if (preferred) modelSelect.value = preferred.id;
  const route = h("input", { id: "route-hint", placeholder: "optional: x-sluice-route hint" });
  const temperature = h("input", { id: "temperature", type: "number", min: "0", max: "2", step: "0.1", value: "0.7" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: "1", value: "128" });
  const system = h("textarea", { id: "system", rows: "2", placeholder: "optional system message" });
  const prompt = h("textarea", { id: "prompt", rows: "5" }, "Write a haiku about rivers.");
  const extra = h("textarea", { id: "extra", rows: "2",
    placeholder: 'optional: more body members as JSON, e.g. {"seed": 1}' });
  const send = h("button", { type: "submit", id: "send" }, "Send ▸");
  const stop = h("button", { type: "button", class: "ghost", id: "stop", disabled: true }, "Stop");
  const output = h("div", { class: "output", id: "output" });
  const problems = h("div", { id: "run-error" });
  const traceLink = h("a", { id: "trace-link", hidden: true }, "Open the trace tree →");
  const stats = h("div", { class: "stats" },
    stat("status", "s-status"), stat("first token", "s-ttft"), stat("latency", "s-latency"),
    stat("tokens in / out", "s-tokens"), stat("cost", "s-cost"), stat("cache", "s-cache"),
    stat("served by", "s-served"), stat("request", "s-request"));
  const set = (id, text) => { document.getElementById(id).textContent = text; };

  let controller = null;
  const form = h("form", { class: "panel" },
    h("h2", {}, "Request"),
    h("label", { for: "model" }, "Model or route"), modelSelect,
    h("label", { for: "route-hint" }, "Route hint"), route,
    h("div", { class: "row" },
      h("div", {}, h("label", { for: "temperature" }, "Temperature"), temperature),
      h("div", {}, h("label", { for: "max-tokens" }, "Max tokens"), maxTokens)),
    h("label", { for: "system" }, "System"), system,
    h("label", { for: "prompt" }, "Prompt"), prompt,
    h("label", { for: "extra" }, "Extra body (JSON)"), extra,
    h("div", { class: "row", style: "margin-top:14px" }, send, stop));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problems.replaceChildren();
    output.textContent = "";
    delete output.dataset.firstTokenMs;
    delete output.dataset.firstByteMs;
    delete output.dataset.done;
    traceLink.hidden = true;
    for (const id of ["s-status", "s-ttft", "s-latency", "s-tokens", "s-cost", "s-cache", "s-served", "s-request"]) set(id, "–");
    let body;
    try {
      body = {
        model: modelSelect.value,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number(maxTokens.value) || undefined,
        temperature: temperature.value === "" ? undefined : Number(temperature.value),
        messages: [...(system.value.trim() ? [{ role: "system", content: system.value }] : []),
          { role: "user", content: prompt.value }],
        ...(extra.value.trim() ? JSON.parse(extra.value) : {}),
      };
    } catch (err) {
      problems.replaceChildren(errorBox(new ApiError(0, { title: "Extra body is not JSON", detail: err.message })));
      return;
    }
    const headers = { Authorization: `Bearer ${session.key}`, "Content-Type": "application/json" };
    if (route.value.trim()) headers["x-sluice-route"] = route.value.trim();
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    set("s-status", "streaming…");
    const started = performance.now();
    let tokens = 0;
    const showTrace = (traceId) => {
      if (!traceId) return;
      traceLink.href = `/console/trace?id=${traceId}`;
      traceLink.hidden = false;
    };
    try {
      let response;
      try {
        response = await fetch("/v1/chat/completions", {
          method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new ApiError(0, { title: "The gateway did not answer", detail: err.message });
      }
      set("s-request", response.headers.get("x-request-id") || "–");
      set("s-cache", response.headers.get("x-sluice-cache") || "–");
      set("s-served", response.headers.get("x-sluice-deployment") || "–");
      showTrace(traceIdOf(response.headers.get("traceparent")));
      if (!response.ok) await readJson(response);
      await readSse(response, (chunk) => {
        if (chunk.error) {
          problems.replaceChildren(errorBox(new ApiError(0, chunk.error), "The stream ended with an error"));
        }
        for (const choice of chunk.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (!output.dataset.firstTokenMs) {
              output.append(text);
              // Measured once the browser has painted the first token.
              requestAnimationFrame(() => {
                output.dataset.firstTokenMs = String(performance.now() - started);
                set("s-ttft", ms(performance.now() - started));
              });
            } else {
              output.append(text);
            }
            tokens += 1;
            set("s-tokens", `– / ${tokens}`);
            set("s-latency", ms(performance.now() - started));
          }
        }
        const s = chunk.sluice;
        if (s) {
          set("s-status", s.status || "–");
          document.getElementById("s-status").className = `v badge ${s.status || ""}`;
          set("s-tokens", `${s.usage.input_tokens} / ${s.usage.output_tokens}`);
          set("s-cost", usd(Math.round((s.cost_usd || 0) * 1e9)));
          set("s-latency", `${ms(s.latency_ms.total)} (ttft ${ms(s.latency_ms.ttft)})`);
          if (s.model_served) set("s-served", `${s.provider || ""} ${s.model_served}`.trim());
          showTrace(s.trace_id);
        }
      }, () => { output.dataset.firstByteMs = String(performance.now() - started); });
    } catch (err) {
      if (err.name === "AbortError") set("s-status", "stopped");
      else { problems.replaceChildren(errorBox(err, "The request failed")); set("s-status", "failed"); }
    } finally {
      output.dataset.done = "1";
      send.disabled = false;
      stop.disabled = true;
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());

  main.append(
    h("h1", {}, "Playground"),
    h("p", { class: "sub" }, "Send a prompt through Sluice and watch the answer stream, with what it cost and how it went."),
    h("div", { class: "grid two" }, form,
      h("div", { class: "panel" }, h("h2", {}, "Answer"), problems, output, stats,
        h("p", { class: "small" }, traceLink))));
});
