// The console's only script: the operator token (kept for this tab only, in sessionStorage),
// actions sent with it and the page's CSRF token, the list refreshed in place, a saga's page
// fed by server-sent events, and the definition graphs drawn by the embedded Mermaid.
"use strict";

const TOKEN_KEY = "saga-operator-token";
const csrf = document.querySelector('meta[name="saga-csrf"]')?.content ?? "";

function flash(text, ok) {
  const el = document.getElementById("flash");
  if (!el) return;
  el.textContent = text;
  el.className = ok ? "flash ok" : "flash error";
}

function token(ask) {
  let t = sessionStorage.getItem(TOKEN_KEY);
  if (!t && ask) {
    t = window.prompt("Operator token (kept for this tab only)");
    if (t) sessionStorage.setItem(TOKEN_KEY, t.trim());
  }
  return t ? t.trim() : null;
}

// POSTs `body` as JSON with the operator token; returns the parsed answer or throws with the
// server's message.
async function act(url, body) {
  const t = token(true);
  const headers = { "Content-Type": "application/json", "X-Saga-Console": csrf };
  // Not `Authorization`: with --console-token the browser sends its Basic credentials there.
  if (t) headers["X-Saga-Operator-Token"] = t;
  const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), credentials: "same-origin" });
  let answer = {};
  try { answer = await res.json(); } catch (_) { /* not JSON: the status says it */ }
  if (res.status === 401 || res.status === 403) sessionStorage.removeItem(TOKEN_KEY);
  if (!res.ok) throw new Error(answer.error || res.status + " " + res.statusText);
  return answer;
}

function filters() {
  const form = document.getElementById("filters");
  const out = {};
  if (!form) return out;
  for (const [k, v] of new FormData(form).entries()) if (v) out[k] = v;
  return out;
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  ev.preventDefault();
  const action = b.dataset.action;
  try {
    if (action === "abort") {
      const reason = window.prompt("Why abort this saga? (recorded in its history)");
      if (reason === null) return;
      const r = await act(`/console/api/sagas/${b.dataset.saga}/abort`, { reason });
      flash(`Aborted: ${r.saga_id} is ${r.state}`, true);
    } else if (action === "retry") {
      const r = await act(`/console/api/sagas/${b.dataset.saga}/retry`, {});
      flash(`Retried: ${r.saga_id} is ${r.state}`, true);
    } else if (action === "bulk-retry" || action === "bulk-abort") {
      const verb = action === "bulk-retry" ? "retry" : "abort";
      const body = { action: verb, filters: filters() };
      const dry = await act("/console/api/bulk", { ...body, confirm: false });
      if (dry.count === 0) { flash(`No saga in this selection to ${verb}.`, false); return; }
      let reason = "";
      if (verb === "abort") {
        reason = window.prompt(`Abort ${dry.count} sagas? Why (recorded in each history)`);
        if (reason === null) return;
      } else if (!window.confirm(`Retry ${dry.count} FAILED sagas?`)) {
        return;
      }
      const r = await act("/console/api/bulk", { ...body, confirm: true, expected: dry.count, reason });
      flash(`${verb}: ${r.done} done, ${r.refused} refused` + (r.first_error ? ` (${r.first_error})` : ""), r.refused === 0);
    } else if (action === "forget-token") {
      sessionStorage.removeItem(TOKEN_KEY);
      flash("Operator token forgotten for this tab.", true);
      return;
    }
    refreshList();
  } catch (e) {
    flash(e.message, false);
  }
});

// The list page: the rows are fetched again every 2 s (a fragment, not a page reload).
async function refreshList() {
  const body = document.querySelector("tbody[data-live]");
  if (!body) return;
  const url = new URL(window.location.href);
  url.searchParams.set("fragment", "1");
  try {
    const res = await fetch(url, { credentials: "same-origin" });
    if (res.ok) body.innerHTML = await res.text();
  } catch (_) { /* the next tick tries again */ }
}
if (document.querySelector("tbody[data-live]")) setInterval(refreshList, 2000);

// A saga's page: its body is replaced by each server-sent update until the saga is terminal.
const live = document.querySelector("[data-live-saga]");
if (live) {
  const source = new EventSource(`/console/sagas/${live.dataset.liveSaga}/live`);
  source.addEventListener("saga", (ev) => { live.innerHTML = ev.data; });
  source.addEventListener("end", () => { source.close(); live.dataset.ended = "1"; });
}

if (window.mermaid) {
  window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "neutral" });
  window.mermaid.run({ querySelector: "pre.mermaid" });
}
