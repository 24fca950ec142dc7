import { api, errorBox, h, session } from "./console.js";

const main = document.getElementById("main");
const next = new URLSearchParams(location.search).get("next") || "/console/playground";
const target = next.startsWith("/console/") ? next : "/console/playground";

if (session.key && session.me) location.replace(target);

const input = h("input", { id: "api-key", type: "password", autocomplete: "off",
  placeholder: "sk-…", required: true });
const status = h("div", { id: "login-status" });
const button = h("button", { type: "submit", id: "login-button" }, "Log in");
const form = h("form", { class: "panel login" },
  h("h1", {}, "Sluice console"),
  h("p", { class: "sub" }, "Log in with an API key. It stays in this browser tab only; " +
    "an admin key also opens the keys and teams page."),
  h("label", { for: "api-key" }, "API key"), input,
  h("div", { class: "row", style: "margin-top:14px" }, button),
  status);

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  status.replaceChildren();
  button.disabled = true;
  try {
    const key = input.value.trim();
    const me = await api("/v1/me", { key });
    session.save(key, me);
    location.assign(target);
  } catch (err) {
    status.replaceChildren(errorBox(err, "Log in failed"));
  } finally {
    button.disabled = false;
  }
});

main.replaceChildren(form);
main.dataset.ready = "0";
input.focus();
