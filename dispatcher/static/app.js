// The dispatcher's live dashboard: polls api/dashboard once a second and redraws.
// Every string from the server goes into the page as text (textContent), never as HTML.
"use strict";

const POLL_S = 1;
const TIMEOUT_S = 5;
const TOKEN_KEY = "falconet.token";
const STATES = ["pending", "dispatched", "running", "done", "failed", "cancelled"];
const FLEET_STATES = ["requested", "booting", "idle", "busy", "releasing"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (sel) => document.querySelector(sel);
const count = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const rate = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
const usd = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });

let updates = 0;
let lastOk = null;         // wall time (ms) of the last successful update
let failingSince = null;   // wall time (ms) of the first failure in a row

// ------------------------------------------------------------------ small helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

// A bar filled to part/whole; its width is set through the CSSOM, which the server's
// Content-Security-Policy allows (it blocks style attributes).
function bar(cls, part, whole) {
  const fill = el("i", { class: cls });
  fill.style.width = `${Math.min(100, (100 * part) / Math.max(whole, 1e-9))}%`;
  return fill;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const clock = (wall_s) => new Date(wall_s * 1000).toLocaleTimeString([], { hour12: false });

function needsText(needs) {
  const parts = [`cpus=${needs.cpus}`];
  if (needs.memory_mb) parts.push(`memory=${needs.memory_mb} MB`);
  if (needs.arch) parts.push(`arch=${needs.arch}`);
  if (needs.tags && needs.tags.length) parts.push(`tags=${needs.tags.join(",")}`);
  if (needs.where && needs.where !== "any") parts.push(`where=${needs.where}`);
  if (needs.prefer) parts.push(`prefer=${needs.prefer}`);
  return parts.join(" ");
}

function setField(name, text) {
  for (const node of document.querySelectorAll(`[data-field="${name}"]`)) node.textContent = text;
}

function fillTable(id, rows) {
  $(`#${id} tbody`).replaceChildren(...rows);
  $(`#${id}`).hidden = rows.length === 0;
  $(`#${id}-empty`).hidden = rows.length !== 0;
}

// ------------------------------------------------------------------ panels

function renderTotals(status) {
  for (const key of ["submitted_total", "queued", "executors", "busy", "slots", "clients"]) {
    setField(key, count.format(status[key]));
  }
  setField("tasks_per_s", rate.format(status.tasks_per_s));
  setField("uptime_s", duration(status.uptime_s));
  $("#dispatcher").textContent = `dispatcher ${status.dispatcher_id} · ${status.durability}` +
    (status.endpoints && status.endpoints.client ? ` · ${status.endpoints.client}` : "");
}

function renderStates(tasks) {
  const total = Math.max(1, STATES.reduce((sum, s) => sum + (tasks[s] || 0), 0));
  $("#states tbody").replaceChildren(...STATES.map((s) => el("tr", {},
    el("th", {}, s),
    el("td", { class: "bar" }, bar(`fill ${s}`, tasks[s] || 0, total)),
    el("td", { class: "num", "data-field": `tasks.${s}` }, count.format(tasks[s] || 0)))));
}

function renderExecutors(table) {
  const rows = [...table].sort((a, b) => a.id.localeCompare(b.id)).map((e) => el("tr", { "data-executor": e.id },
    el("td", { "data-col": "id" }, e.id),
    el("td", { "data-col": "host" }, e.host),
    el("td", { "data-col": "addresses", class: "small" }, e.addresses.join(" ")),
    el("td", { "data-col": "site" }, e.site),
    el("td", { "data-col": "type" }, (e.facts && e.facts.instance_type) || "–"),
    el("td", { "data-col": "cpus", class: "num" }, e.cpus),
    el("td", { "data-col": "busy" }, el("span", { class: "meter" },
      bar("", e.busy, e.slots)), ` ${e.busy} / ${e.slots}`),
    el("td", { "data-col": "completed", class: "num" }, count.format(e.completed)),
    el("td", { "data-col": "idle", class: "num" }, e.idle_s > 0 ? duration(e.idle_s) : "–"),
    el("td", { "data-col": "state" }, el("span", { class: `badge ${e.state}` }, e.state))));
  fillTable("executors", rows);
}

function renderFleet(fleet) {
  const box = $("#fleet");
  if (!fleet) {
    box.replaceChildren(el("p", { class: "empty muted" }, "No provisioner reporting."));
    return;
  }
  const types = {};
  for (const n of fleet.nodes) types[n.type] = (types[n.type] || 0) + 1;
  const spend = fleet.budget_usd > 0
    ? [el("span", { class: "meter wide" }, bar("", fleet.spent_usd, fleet.budget_usd)),
      ` ${usd.format(fleet.spent_usd)} of ${usd.format(fleet.budget_usd)}`]
    : [`${usd.format(fleet.spent_usd)} (no budget cap)`];
  const decisions = [...fleet.decisions].reverse().slice(0, 5).map((d) => el("li", {},
    el("span", { class: "muted" }, clock(d.at) + (d.repeats ? ` (×${d.repeats})` : "")),
    el("ul", {}, ...d.reasons.map((r) => el("li", {}, r)))));
  box.replaceChildren(
    el("p", { class: "muted" }, `${fleet.backend} backend · cluster ${fleet.cluster} · policy ${fleet.policy}` +
      ` · ${fleet.min_executors} to ${fleet.max_executors} executors`),
    el("div", { class: "chips" }, ...FLEET_STATES.map((s) => el("span", { class: `chip ${s}` },
      el("b", { "data-field": `fleet.counts.${s}` }, fleet.counts[s] || 0), ` ${s}`))),
    el("dl", {},
      el("dt", {}, "Instance types"),
      el("dd", {}, Object.keys(types).sort().map((t) => `${t} ×${types[t]}`).join(", ") || "none"),
      el("dt", {}, "Spend"), el("dd", {}, ...spend)),
    ...(fleet.last_error ? [el("p", { class: "error" }, `Last error: ${fleet.last_error}`)] : []),
    el("h3", {}, "Latest scaling decisions"),
    decisions.length ? el("ol", { class: "decisions" }, ...decisions) : el("p", { class: "muted" }, "None yet."));
}

function renderUnschedulable(classes) {
  fillTable("unschedulable", classes.map((w) => el("tr", {},
    el("td", { class: "mono" }, needsText(w.needs)),
    el("td", { class: "num" }, count.format(w.count)),
    el("td", { class: "num" }, duration(w.oldest_s)),
    el("td", {}, w.reason))));
}

function renderFailures(failures) {
  fillTable("failures", [...failures].reverse().map((f) => el("tr", {},
    el("td", {}, clock(f.at)),
    el("td", { class: "mono" }, `${f.client}/${f.seq}`),
    el("td", {}, f.executor),
    el("td", { class: "num" }, f.attempt),
    el("td", { class: "num", "data-field": "exit_code" }, f.exit_code ?? "–"),
    el("td", {}, f.reason),
    el("td", {}, el("pre", {}, f.stderr_tail)))));
}

// ------------------------------------------------------------------ the chart

// The top of an axis of four intervals, each a round step (1, 2 or 5 times a power of ten).
function axisMax(v, minStep) {
  const raw = Math.max(minStep, v / 4);
  const power = 10 ** Math.floor(Math.log10(raw));
  return 4 * [1, 2, 5, 10].map((m) => m * power).find((step) => step >= raw - 1e-9);
}

function renderChart(h) {
  const chart = $("#chart");
  const width = chart.clientWidth || 800, height = chart.clientHeight || 220;
  const m = { left: 52, right: 52, top: 24, bottom: 24 };
  const w = width - m.left - m.right, ht = height - m.top - m.bottom;
  const t = h.t, end = t.length ? t[t.length - 1] : 0;
  const span = Math.max(60, t.length ? end - t[0] : 0);
  const x = (ts) => m.left + w * (1 - (end - ts) / span);
  const nodes = [];
  for (let i = 0; i <= 4; i++) {
    const y = m.top + (ht * i) / 4;
    nodes.push(svg("line", { class: "grid", x1: m.left, x2: width - m.right, y1: y, y2: y }));
  }
  const axes = [["tasks_per_s", "rate", 0.1, m.left - 6, "end"], ["queued", "queue", 1, width - m.right + 6, "start"]];
  for (const [key, cls, minStep, ax, anchor] of axes) {
    const max = axisMax(Math.max(0, ...h[key]), minStep);
    const y = (v) => m.top + ht * (1 - v / max);
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      nodes.push(svg("text", { class: `tick ${cls}`, x: ax, y: y(v) + 4, "text-anchor": anchor }, rate.format(v)));
    }
    const points = t.map((ts, i) => `${x(ts).toFixed(1)},${y(h[key][i]).toFixed(1)}`).join(" ");
    nodes.push(svg("polyline", { class: `line ${cls}`, points }));
  }
  nodes.push(svg("text", { class: "axis rate", x: m.left - 6, y: 10, "text-anchor": "end" }, "tasks/s"));
  nodes.push(svg("text", { class: "axis queue", x: width - m.right + 6, y: 10 }, "queued"));
  const stepS = span > 300 ? 120 : span > 120 ? 60 : 30;
  for (let ago = 0; ago <= span; ago += stepS) {
    const label = ago === 0 ? "now" : ago % 60 ? `−${ago} s` : `−${ago / 60} min`;
    nodes.push(svg("text", { class: "tick", x: x(end - ago), y: height - 6, "text-anchor": "middle" }, label));
  }
  chart.replaceChildren(...nodes);
}

// ------------------------------------------------------------------ polling, token, liveness

function takeTokenFromUrl() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token === null) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  url.searchParams.delete("token");
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
}

function showLogin(refused) {
  $("#login-refused").hidden = !refused;
  $("#data").hidden = true;
  $("#banner").hidden = true;
  $("#updated-at").textContent = "token needed";
  $("#login").hidden = false;
  $("#login input").focus();
}

function showDown(why) {
  failingSince = failingSince || Date.now();
  const last = lastOk ? `last update at ${new Date(lastOk).toLocaleTimeString([], { hour12: false })}` : "no update yet";
  $("#banner").textContent = `The dispatcher is not answering (${why}) since ` +
    `${new Date(failingSince).toLocaleTimeString([], { hour12: false })}; ${last}. Retrying every second.`;
  $("#banner").hidden = false;
  $("#data").classList.add("stale");
}

function render(data) {
  $("#login").hidden = true;
  $("#data").hidden = false;  // before drawing: the chart takes its width from the page
  const s = data.status;
  renderTotals(s);
  renderStates(s.tasks);
  renderChart(data.history);
  renderExecutors(s.executor_table || []);
  renderFleet(s.fleet);
  renderUnschedulable(s.unschedulable || []);
  renderFailures(data.failures || []);
  updates += 1;
  lastOk = Date.now();
  failingSince = null;
  $("#banner").hidden = true;
  $("#data").classList.remove("stale");
  setField("updated", count.format(updates));
  $("#updated-at").textContent = `at ${clock(data.at)}`;
}

// The dashboard's JSON; null on a 401; an Error saying why the dispatcher did not answer.
async function fetchDashboard(token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const reply = await fetch("api/dashboard", { headers, cache: "no-store", signal: AbortSignal.timeout(TIMEOUT_S * 1000) });
    if (reply.status === 401) return null;
    if (!reply.ok) return new Error(`HTTP ${reply.status}`);
    return await reply.json();
  } catch (err) {
    const why = { TimeoutError: `no reply in ${TIMEOUT_S} s`, TypeError: "no connection" }[err.name];
    return new Error(why || err.message);
  }
}

async function poll() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const data = await fetchDashboard(token);
  if (data === null) return showLogin(Boolean(token));  // polling resumes once a token is given
  setTimeout(poll, POLL_S * 1000);  // first, so that a page bug in render does not stop polling
  if (data instanceof Error) showDown(data.message);
  else if (!data.status || !data.status.tasks) $("#updated-at").textContent = "waiting for the first snapshot";
  else render(data);
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#login input").value);
  $("#login").hidden = true;
  poll();
});

takeTokenFromUrl();
poll();
