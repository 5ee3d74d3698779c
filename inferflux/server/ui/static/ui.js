// Shared by the /debug and /admin pages: the admin key (sessionStorage only) and JSON calls with it.
"use strict";
const IFX = {
  KEY: "inferflux.admin_key",
  key() { return sessionStorage.getItem(IFX.KEY) || ""; },
  async api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (IFX.key()) headers["Authorization"] = "Bearer " + IFX.key();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = data.error && (data.error.message || data.error);
      throw new Error(`${response.status}: ${error || response.statusText}`);
    }
    return data;
  },
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
    return node;
  },
  fill(id, ...children) { const node = document.getElementById(id); node.replaceChildren(...children.flat()); return node; },
  // The key box in the header: typing or pasting a key is the whole step; it stays for this tab only.
  keyBox(onChange) {
    const input = document.getElementById("admin-key");
    input.value = IFX.key();
    input.addEventListener("input", () => { sessionStorage.setItem(IFX.KEY, input.value.trim()); onChange && onChange(); });
  },
  when(t) { return t ? new Date(t * 1000).toLocaleString() : ""; },
};
