import { api, badge, empty, errorBox, h, page, showError } from "./console.js";

const SCOPES = ["chat", "jobs", "usage:read", "admin"];

page(async (main, me) => {
  if (!me.admin) {
    main.append(h("h1", {}, "Keys & teams"), h("div", { class: "panel" },
      empty("Admin keys only", "Log in with a key that has the admin scope to manage keys and teams.")));
    return;
  }
  const secretBox = h("div", { id: "secret-box" });
  const teamsPanel = h("div", { class: "panel", id: "teams" });
  const keysPanel = h("div", { class: "panel", id: "keys" });
  const teamFilter = h("select", { id: "key-team-filter" });
  let teams = [];

  function showSecret(view, what) {
    // Shown this once: the gateway keeps only its hash, and the console keeps nothing.
    secretBox.replaceChildren(h("div", { class: "notice", role: "status" },
      h("strong", {}, `${what}: ${view.name} (${view.key_id})`),
      h("p", { class: "small" }, "Copy the secret now: it is shown this once and cannot be read again."),
      h("div", { class: "secret", id: "new-secret" }, view.secret),
      h("div", { class: "row", style: "margin-top:8px" },
        h("button", { type: "button", class: "small", onclick: () => navigator.clipboard?.writeText(view.secret) }, "Copy"),
        h("button", { type: "button", class: "ghost small", id: "secret-dismiss", onclick: () => secretBox.replaceChildren() }, "I have saved it"))));
  }

  async function loadTeams() {
    teams = (await api("/v1/admin/teams")).data;
    const current = teamFilter.value;
    teamFilter.replaceChildren(...teams.map((t) => h("option", { value: t.team_id }, t.team_id)));
    if (current && teams.some((t) => t.team_id === current)) teamFilter.value = current;
    teamsPanel.replaceChildren(h("h2", {}, "Teams"),
      teams.length ? h("table", {}, h("thead", {}, h("tr", {}, ["team", "name", "tier", "budgets (day / month)"].map((t) => h("th", {}, t)))),
        h("tbody", {}, teams.map((t) => h("tr", { "data-team": t.team_id }, h("td", { class: "mono" }, t.team_id), h("td", {}, t.name || "–"),
          h("td", {}, t.tier || "default"), h("td", {}, `${t.budgets?.usd_per_day || "0"} / ${t.budgets?.usd_per_month || "0"} USD`)))))
        : empty("No teams yet", "Create one below; keys belong to a team."),
      me.operator ? teamForm() : null);
  }

  function teamForm() {
    const id = h("input", { id: "team-id", placeholder: "team id, e.g. search" });
    const name = h("input", { id: "team-name", placeholder: "display name" });
    const perDay = h("input", { id: "team-budget-day", placeholder: "USD per day (optional)" });
    const form = h("form", { class: "row", style: "margin-top:12px" }, id, name, perDay,
      h("button", { type: "submit", id: "team-create" }, "Create team"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const body = { team_id: id.value.trim(), name: name.value.trim() || id.value.trim() };
        if (perDay.value.trim()) body.budgets = { usd_per_day: perDay.value.trim() };
        await api("/v1/admin/teams", { method: "POST", body });
        teamFilter.value = body.team_id;
        await loadTeams();
        await loadKeys();
      } catch (err) { showError(err, "Create team failed"); }
    });
    return form;
  }

  let listing = 0;
  async function loadKeys() {
    // Only the newest listing is drawn: an older answer arriving late would replace the
    // form the user is already typing into with another team's. The panel says while one
    // is on its way.
    const mine = ++listing;
    keysPanel.dataset.loading = "";
    const team = teamFilter.value;
    let keys;
    try {
      keys = (await api(`/v1/admin/keys${team ? `?team_id=${encodeURIComponent(team)}` : ""}`)).data;
    } finally {
      if (mine === listing) delete keysPanel.dataset.loading;
    }
    if (mine !== listing) return;
    const rows = keys.map((k) => {
      const live = ["active", "rotating"].includes(k.status);
      return h("tr", { "data-key": k.key_id, "data-name": k.name },
        h("td", {}, k.name), h("td", { class: "mono" }, k.key_id), h("td", { class: "mono" }, `${k.secret_prefix}…`),
        h("td", {}, k.scopes.join(", ")), h("td", { class: "key-status" }, badge(k.status)),
        h("td", {}, h("div", { class: "row" },
          h("button", { class: "ghost small", "data-action": "rotate", disabled: !live, onclick: async () => {
            try { showSecret(await api(`/v1/admin/keys/${k.key_id}/rotate`, { method: "POST", body: { grace_seconds: 0 } }), "Rotated"); await loadKeys(); }
            catch (err) { showError(err, "Rotate failed"); }
          } }, "Rotate"),
          h("button", { class: "danger small", "data-action": "revoke", disabled: k.status === "revoked", onclick: async () => {
            if (!confirm(`Revoke ${k.name}? It stops working at once.`)) return;
            try { await api(`/v1/admin/keys/${k.key_id}/revoke`, { method: "POST", body: {} }); await loadKeys(); }
            catch (err) { showError(err, "Revoke failed"); }
          } }, "Revoke"))));
    });
    const name = h("input", { id: "key-name", placeholder: "key name, e.g. backend-prod" });
    const scopes = SCOPES.map((s) => h("label", { class: "fit", style: "display:flex;gap:4px;margin:0" },
      h("input", { type: "checkbox", value: s, checked: s === "chat", style: "width:auto" }), s));
    const form = h("form", { class: "row", style: "margin-top:12px" }, name, ...scopes,
      h("button", { type: "submit", id: "key-create" }, "Create key"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const chosen = scopes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
        showSecret(await api("/v1/admin/keys", { method: "POST",
          body: { team_id: teamFilter.value, name: name.value.trim(), scopes: chosen } }), "Created");
        name.value = "";
        await loadKeys();
      } catch (err) { showError(err, "Create key failed"); }
    });
    keysPanel.replaceChildren(
      h("div", { class: "row" }, h("h2", {}, "Keys"), h("label", { class: "fit", for: "key-team-filter", style: "margin:0" }, "team"), teamFilter),
      teams.length ? (rows.length ? h("table", { id: "key-table" }, h("thead", {}, h("tr", {}, ["name", "id", "secret", "scopes", "status", ""].map((t) => h("th", {}, t)))), h("tbody", {}, rows))
        : empty("No keys in this team", "Create the first one below; its secret is shown once.")) : null,
      teams.length ? form : empty("No team", "Create a team first."));
  }

  teamFilter.addEventListener("change", () => loadKeys().catch((err) => keysPanel.prepend(errorBox(err))));
  main.append(h("h1", {}, "Keys & teams"),
    h("p", { class: "sub" }, "Create, rotate and revoke API keys. Only a key's hash is stored: its secret is shown once."),
    secretBox, teamsPanel, keysPanel);
  await loadTeams();
  await loadKeys();
});
