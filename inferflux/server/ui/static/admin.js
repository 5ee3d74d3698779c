// /admin: API keys, tenants, limits and policies over the /admin/* JSON routes; each task is three steps or fewer.
"use strict";
(() => {
  const { el, fill, api, when } = IFX;
  const SCOPES = ["inference", "embeddings", "models:read", "models:write", "admin"];
  const status = (text, ok) => { const s = fill("status", text || ""); s.className = ok ? "ok" : "error"; };
  const value = (id) => document.getElementById(id).value.trim();

  fill("key-scopes", SCOPES.map((s) => el("label", {}, el("input", { type: "checkbox", name: "scope", value: s, checked: s === "inference" }), ` ${s} `)));

  let latest = 0;  // refreshes overlap (typing the key, then acting): only the newest one may draw

  async function refresh() {
    const mine = ++latest;
    try {
      const [tenants, keys, limits] = await Promise.all([api("GET", "/admin/tenants"), api("GET", "/admin/keys"), api("GET", "/admin/limits")]);
      if (mine !== latest) return;
      fill("tenant-names", tenants.data.map((t) => el("option", { value: t.name })));
      const tenantBox = document.getElementById("key-tenant");
      // Suggest the first tenant only in a box nobody is typing in (a refresh lands while the key is typed, and
      // writing then would mix the suggestion into the user's text).
      if (!tenantBox.value && !tenantBox.dataset.touched && document.activeElement !== tenantBox && tenants.data.length)
        tenantBox.value = tenants.data[0].name;
      fill("tenants", tenants.data.map((t) => el("tr", { "data-tenant": t.name }, el("td", {}, t.name), el("td", {}, when(t.created)), el("td", {}, t.keys),
        el("td", {}, el("button", { class: "danger", onclick: () => act(`Delete tenant ${t.name} and its keys?`, "DELETE", `/admin/tenants/${encodeURIComponent(t.name)}`) }, "Delete")))));
      fill("keys", keys.data.map((k) => el("tr", { "data-key-id": k.id }, el("td", { class: "mono" }, k.id), el("td", {}, k.tenant), el("td", {}, k.name || ""),
        el("td", {}, k.scopes.join(", ")), el("td", {}, when(k.created)), el("td", {}, when(k.expires) || "never"), el("td", {}, when(k.last_used)),
        el("td", {}, k.active ? "active" : (k.revoked ? "revoked" : "expired")),
        el("td", {}, k.active ? el("button", { class: "danger", onclick: () => act(`Revoke key ${k.id}?`, "POST", `/admin/keys/${encodeURIComponent(k.id)}/revoke`) }, "Revoke") : ""))));
      fill("limits", limits.data.map((l) => el("tr", { "data-tenant": l.tenant }, el("td", {}, l.tenant),
        ["rpm", "tpm", "concurrency", "max_tokens"].map((f) => el("td", {}, l[f] || "")),
        el("td", {}, el("button", { class: "danger", onclick: () => act(`Remove ${l.tenant}'s limits?`, "DELETE", `/admin/limits/${encodeURIComponent(l.tenant)}`) }, "Remove")))));
      if (document.getElementById("status").className === "error") status("");
      refreshPolicies();
    } catch (error) {
      if (mine === latest) status(String(error.message || error));
    }
  }

  // Policies: view the current documents, edit one (Edit fills the form; change it; Save), roll back a version.
  async function refreshPolicies() {
    let current, history;
    try {
      [current, history] = await Promise.all([api("GET", "/admin/policies"), api("GET", "/admin/policies?history=1")]);
    } catch (error) {
      fill("policies", el("tr", {}, el("td", { colspan: 6, class: "muted" }, `policies unavailable: ${error.message || error}`)));
      return;
    }
    fill("policy-version", current.policy_version);
    const doc = (d) => el("code", {}, JSON.stringify(d));
    fill("policies", current.data.map((p) => el("tr", { "data-scope": p.scope }, el("td", {}, p.scope), el("td", {}, p.version),
      el("td", {}, when(p.created)), el("td", {}, p.actor), el("td", {}, doc(p.document)),
      el("td", {}, el("button", { class: "secondary", onclick: () => {
        document.getElementById("policy-scope").value = p.scope;
        document.getElementById("policy-document").value = JSON.stringify(p.document, null, 2);
      } }, "Edit")))));
    const latest = new Map(current.data.map((p) => [p.scope, p.version]));
    fill("policy-history", history.data.slice().reverse().map((p) => el("tr", { "data-version": p.version }, el("td", {}, p.version),
      el("td", {}, p.scope), el("td", {}, when(p.created)), el("td", {}, p.actor), el("td", {}, doc(p.document)),
      el("td", {}, latest.get(p.scope) === p.version ? "current" : el("button", { class: "danger",
        onclick: () => act(`Roll ${p.scope} back to version ${p.version}?`, "POST", "/admin/policies/rollback", { version: p.version }) }, "Roll back")))));
  }

  document.getElementById("set-policy").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const document_ = JSON.parse(value("policy-document") || "{}");
      const row = await api("PUT", "/admin/policies", { scope: value("policy-scope"), document: document_ });
      status(`policy of ${row.scope} is version ${row.version}`, true);
    } catch (error) {
      status(String(error.message || error));
    }
    refresh();
  });

  // A destructive action: click, confirm (two steps).
  async function act(question, method, path, body) {
    if (!confirm(question)) return;
    try { await api(method, path, body); status("done", true); } catch (error) { status(String(error.message || error)); }
    refresh();
  }

  async function ensureTenant(name) {
    const tenants = await api("GET", "/admin/tenants");
    if (!tenants.data.some((t) => t.name === name)) await api("POST", "/admin/tenants", { name });
  }

  // Create a key: (admin key), tenant (filled with the first one), click: the key is shown once.
  document.getElementById("key-tenant").addEventListener("input", (event) => { event.target.dataset.touched = "1"; });
  document.getElementById("create-key").addEventListener("submit", async (event) => {
    event.preventDefault();
    const scopes = [...document.querySelectorAll("input[name=scope]:checked")].map((c) => c.value);
    const body = { tenant: value("key-tenant"), scopes, name: value("key-name") };
    if (value("key-expires") && value("key-expires") !== "never") body.expires = value("key-expires");
    try {
      await ensureTenant(body.tenant);
      const created = await api("POST", "/admin/keys", body);
      fill("new-key-value", created.key);
      document.getElementById("new-key").hidden = false;
      status(`key ${created.id} created for ${created.tenant}`, true);
    } catch (error) {
      status(String(error.message || error));
    }
    refresh();
  });

  document.getElementById("create-tenant").addEventListener("submit", async (event) => {
    event.preventDefault();
    try { await api("POST", "/admin/tenants", { name: value("tenant-name") }); status("tenant created", true); } catch (error) { status(String(error.message || error)); }
    refresh();
  });

  document.getElementById("set-limits").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    for (const f of ["rpm", "tpm", "concurrency", "max_tokens"]) if (value(`limits-${f}`) !== "") body[f] = Number(value(`limits-${f}`));
    try { await api("PUT", `/admin/limits/${encodeURIComponent(value("limits-tenant"))}`, body); status("limits saved", true); } catch (error) { status(String(error.message || error)); }
    refresh();
  });

  IFX.keyBox(refresh);
  refresh();
})();
