// Shared by every console page: the session (the key, kept for this tab only), calls to
// the JSON API with it, errors shown on the page (never a blank one), and small helpers.

const KEY = "sluice.console.key";
const ME = "sluice.console.me";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get me() { const raw = sessionStorage.getItem(ME); return raw ? JSON.parse(raw) : null; },
  save(key, me) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(ME, JSON.stringify(me)); },
  clear() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(ME); },
};

export class ApiError extends Error {
  constructor(status, problem, traceparent) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || problem.type || "";
    this.title = problem.title || "The request failed";
    this.fix = problem.how_to_fix || problem.fix || "";
    this.traceId = problem.trace_id || traceIdOf(traceparent) || "";
  }
}

export function traceIdOf(traceparent) {
  const parts = (traceparent || "").split("-");
  return parts.length === 4 ? parts[1] : "";
}

// A call to the gateway with the session's key. Answers the parsed JSON, or throws an
// ApiError made from the problem+json (or from the network failure).
export async function api(path, { method = "GET", body, headers = {}, key } = {}) {
  const init = { method, headers: { Authorization: `Bearer ${key || session.key}`, ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, { title: "The gateway did not answer",
      detail: `Sluice could not be reached (${err.message}). Is the stack running?` });
  }
  return readJson(response);
}

export async function readJson(response) {
  const text = await response.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch { data = { detail: text.slice(0, 300) }; }
  if (!response.ok) {
    throw new ApiError(response.status, data, response.headers.get("traceparent"));
  }
  return data;
}

// Builds an element: h("div", {class: "x", onclick: fn}, "text", child, ...).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function errorBox(err, context = "") {
  const box = h("div", { class: "error-box", role: "alert" },
    h("h3", {}, context ? `${context}: ${err.title || "error"}` : (err.title || "Something went wrong")),
    h("div", { class: "detail" }, err.message || String(err)),
    err.fix ? h("div", { class: "fix" }, err.fix) : null,
    (err.code || err.status || err.traceId)
      ? h("div", { class: "meta" }, [err.status ? `HTTP ${err.status}` : "", err.code,
          err.traceId ? `trace ${err.traceId}` : ""].filter(Boolean).join(" · "))
      : null);
  return box;
}

// Shows an error at the top of the page's content (above whatever was there).
export function showError(err, context = "") {
  const main = document.getElementById("main");
  main.querySelectorAll(":scope > .error-box.page-error").forEach((e) => e.remove());
  const box = errorBox(err, context);
  box.classList.add("page-error");
  main.prepend(box);
  return box;
}

export function empty(title, text) {
  return h("div", { class: "empty" }, h("strong", {}, title), text);
}

export function badge(text) {
  return h("span", { class: `badge ${String(text).replace(/[^a-z_]/gi, "")}` }, text);
}

// Exact nano-USD as dollars: cents above a cent, three significant digits below it.
export function usd(nanos) {
  const value = Number(nanos || 0) / 1e9;
  if (!value || Math.abs(value) >= 0.01) return `$${value.toFixed(2)}`;
  return `$${Number(value.toPrecision(3)).toFixed(9).replace(/0+$/, "")}`;
}

export function ms(value) {
  return value === undefined || value === null ? "–" : `${Math.round(value)} ms`;
}

export function pct(rate) {
  return rate === null || rate === undefined ? "–" : `${(rate * 100).toFixed(1)}%`;
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

// Runs a page: signed in or back to the login, the navigation for this key, and the
// page's content; anything that fails shows as an error on the page.
export async function page(render) {
  window.addEventListener("unhandledrejection", (e) => showError(e.reason || e, "Unexpected error"));
  window.addEventListener("error", (e) => showError(e.error || new Error(e.message), "Unexpected error"));
  const me = session.me;
  if (!session.key || !me) {
    location.replace(`/console/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    return;
  }
  document.getElementById("who").textContent =
    `${me.name || me.key_id} · ${me.team_id || "no team"}${me.operator ? " · operator" : ""}`;
  if (me.admin) document.querySelectorAll("nav a[data-admin]").forEach((a) => { a.hidden = false; });
  document.getElementById("logout").addEventListener("click", () => {
    session.clear();
    location.assign("/console/login");
  });
  const main = document.getElementById("main");
  const started = performance.now();
  try {
    main.replaceChildren();
    await render(main, me);
    main.dataset.ready = String(Math.round(performance.now() - started));
  } catch (err) {
    main.replaceChildren(errorBox(err, "This page could not load"));
    main.dataset.ready = "error";
  }
}
