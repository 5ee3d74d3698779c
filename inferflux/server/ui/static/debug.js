// /debug: polls /debug/api/kv and /debug/api/traces, draws the page map, the queues and a token trace.
"use strict";
(() => {
  const { el, fill, api } = IFX;
  let selected = null;  // the engine request id whose trace is shown
  let highlight = null;  // the sequence whose pages are outlined

  function drawKv(data) {
    const rows = [];
    fill("kv", data.models.map((m) => {
      const owner = new Map();
      for (const s of m.sequences) for (const p of s.pages) owner.set(p, s);
      const mine = new Set(highlight ? m.sequences.filter((s) => key(s) === highlight).flatMap((s) => s.pages) : []);
      for (const s of m.sequences) rows.push([m.model, s]);
      const c = m.counts;
      return el("div", { class: "model", "data-model": m.model },
        el("div", {}, el("b", {}, m.model), ` · ${m.num_pages - 1} pages of ${m.page_size} tokens · `,
          el("span", { class: "counts", "data-free": c.free, "data-used": c.used, "data-prefix": c.prefix, "data-cached": c.cached },
            `free ${c.free} · used ${c.used} · prefix ${c.prefix} · cached ${c.cached}`),
          ` · prefix hits ${m.prefix_cache.hits}/${m.prefix_cache.queries}`),
        el("div", { class: "pages" }, m.pages.map((state, i) => {
          const s = owner.get(i);
          return el("i", { class: `page ${state}${mine.has(i) ? " hl" : ""}`, "data-page": i,
            title: `page ${i}: ${state}${s ? " · " + (s.request_id || s.engine_request_id) : ""}` });
        })));
    }));
    fill("queue", rows.map(([model, s]) => el("tr", { class: "clickable" + (key(s) === highlight ? " selected" : ""),
      "data-state": s.state, "data-request-id": s.request_id || "", onclick: () => { highlight = key(s) === highlight ? null : key(s); } },
      el("td", {}, s.state), el("td", { class: "mono" }, s.request_id || s.engine_request_id), el("td", {}, model),
      el("td", {}, s.sample), el("td", {}, s.prompt_tokens), el("td", {}, s.computed_tokens), el("td", {}, s.cached_tokens),
      el("td", {}, s.output_tokens), el("td", {}, s.max_tokens ?? ""), el("td", {}, s.pages.length), el("td", {}, s.prefix_pages))));
  }

  function key(s) { return `${s.engine_request_id}/${s.sample}`; }

  function drawTraces(data) {
    fill("traces", data.data.map((t) => el("tr", { class: "clickable" + (t.engine_request_id === selected ? " selected" : ""),
      "data-request-id": t.request_id || "", "data-engine-id": t.engine_request_id,
      onclick: () => { selected = t.engine_request_id; showTrace(); } },
      el("td", { class: "mono" }, t.request_id || t.engine_request_id), el("td", {}, t.model), el("td", {}, t.route || ""),
      el("td", {}, t.tenant || ""), el("td", {}, t.prompt_tokens ?? ""), el("td", {}, t.output_tokens),
      el("td", {}, t.finished ? "finished" : "running"), el("td", {}, `${t.age_s.toFixed(1)} s`))));
  }

  async function showTrace() {
    if (!selected) return;
    const t = await api("GET", `/debug/api/traces/${encodeURIComponent(selected)}`);
    fill("trace-title", `${t.request_id || t.engine_request_id} · ${t.model}`);
    fill("trace", t.samples.flatMap((s) => s.tokens.map((tok, i) => el("tr", { class: "token", "data-sample": s.index },
      el("td", {}, t.samples.length > 1 ? `${s.index}:${i}` : i), el("td", { class: "mono" }, tok.id),
      el("td", {}, el("span", { class: "tok" }, tok.text)), el("td", { class: "logprob" }, tok.logprob ?? ""),
      el("td", { class: "alts" }, tok.top.map((a) => el("span", {}, el("span", { class: "tok" }, a.text), ` ${a.logprob}`))),
      el("td", {}, tok.gap_ms === null ? "" : `${tok.gap_ms.toFixed(1)} ms`)))));
  }

  let latest = 0, busy = false;  // one poll at a time; a newer refresh (a new key) wins over an older one

  async function refresh() {
    const mine = ++latest;
    busy = true;
    try {
      const [kv, traces] = await Promise.all([api("GET", "/debug/api/kv"), api("GET", "/debug/api/traces")]);
      if (mine !== latest) return;
      drawKv(kv);
      drawTraces(traces);
      if (selected && traces.data.some((t) => t.engine_request_id === selected && !t.finished)) await showTrace();
      fill("status");
      document.body.dataset.loaded = "1";
    } catch (error) {
      if (mine === latest) fill("status", String(error.message || error));
    } finally {
      if (mine === latest) busy = false;
    }
  }

  IFX.keyBox(refresh);
  const live = document.getElementById("live");
  setInterval(() => { if (live.checked && !busy) refresh(); }, 400);
  refresh();
})();
