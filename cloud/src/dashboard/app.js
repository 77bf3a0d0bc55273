// tidesync fleet dashboard: plain JavaScript over the cloud's JSON API, no build step.
// Routes: #/ (fleet table) and #/device/ID (chart, shadow, desired-state form). The page
// re-renders when /api/events/stream says the log head advanced.
"use strict";

const view = document.getElementById("view");
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const CHART_EVENTS = 200;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function json(value) {
  return el("pre", {}, JSON.stringify(value, null, 1));
}

function isEmpty(value) {
  return value == null || (typeof value === "object" && Object.keys(value).length === 0);
}

async function renderFleet() {
  const { devices } = await api("/api/devices");
  const table = el("table", { id: "fleet" },
    el("tr", {}, ...["device", "status", "last reading", "backlog", "shadow delta"].map((h) => el("th", {}, h))));
  for (const device of devices) {
    const latest = (device.latest || []).map((r) => `${r.sensor} = ${r.value} ${r.unit}`).join(", ");
    const delta = device.shadow ? device.shadow.delta : null;
    const backlog = device.gateway_backlog_events == null ? "–" : device.gateway_backlog_events;
    table.append(el("tr", { "data-device": device.device },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(device.device)}` }, device.device)),
      el("td", { class: device.online ? "online" : "offline" }, device.online ? "online" : "offline"),
      el("td", { class: "latest" }, latest || "–"),
      el("td", { class: "backlog" }, backlog),
      el("td", { class: "delta" }, isEmpty(delta) ? "in sync" : json(delta))));
  }
  view.replaceChildren(el("h2", {}, `Fleet (${devices.length} devices)`), table);
}

// An SVG line chart: one path per sensor over event time.
function chart(readings) {
  const width = 640, height = 220, pad = 30;
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}` });
  if (readings.length === 0) return root;
  const times = readings.map((r) => r.t), values = readings.map((r) => r.v);
  const [t0, t1] = [Math.min(...times), Math.max(...times)];
  const [v0, v1] = [Math.min(...values), Math.max(...values)];
  const x = (t) => pad + ((t - t0) / (t1 - t0 || 1)) * (width - 2 * pad);
  const y = (v) => height - pad - ((v - v0) / (v1 - v0 || 1)) * (height - 2 * pad);
  const sensors = [...new Set(readings.map((r) => r.sensor))];
  sensors.forEach((sensor, i) => {
    const points = readings.filter((r) => r.sensor === sensor);
    const d = points.map((r, j) => `${j ? "L" : "M"}${x(r.t).toFixed(1)},${y(r.v).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, stroke: COLORS[i % COLORS.length], "data-sensor": sensor }));
    const label = svg("text", { x: pad + i * 120, y: 14, fill: COLORS[i % COLORS.length] });
    label.textContent = sensor;
    root.append(label);
  });
  for (const [v, yy] of [[v1, pad], [v0, height - pad]]) {
    const tick = svg("text", { x: 2, y: yy, "font-size": 10 });
    tick.textContent = Number(v.toPrecision(4));
    root.append(tick);
  }
  return root;
}

async function renderDevice(id) {
  const device = await api(`/api/devices/${encodeURIComponent(id)}`);
  const from = Math.max(1, device.high_seq - CHART_EVENTS + 1);
  const { events } = await api(`/api/devices/${encodeURIComponent(id)}/events?from_seq=${from}&limit=${CHART_EVENTS}`);
  const readings = events.filter((e) => e.kind === "reading" || (e.payload && typeof e.payload.value === "number"))
    .map((e) => ({ t: e.event_time_ms, v: e.payload.value, sensor: e.payload.sensor }))
    .sort((a, b) => a.t - b.t);
  const shadow = device.shadow || { reported: {}, desired: {}, delta: {} };
  const form = el("form", { id: "desired-form" },
    el("label", {}, "desired patch (JSON object; null removes a key)"), el("br"),
    el("textarea", { name: "patch" }, "{}"), el("br"),
    el("button", { type: "submit" }, "Save desired"), " ", el("span", { id: "form-status" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = document.getElementById("form-status");
    try {
      const patch = JSON.parse(form.elements.patch.value);
      await api(`/api/devices/${encodeURIComponent(id)}/desired`,
        { method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify(patch) });
      status.textContent = "saved";
      await render();
      document.getElementById("form-status").textContent = "saved";
    } catch (error) {
      status.textContent = error.message;
      status.className = "error";
    }
  });
  const presence = device.presence || {};
  view.replaceChildren(
    el("p", {}, el("a", { href: "#/" }, "← fleet")),
    el("h2", { id: "device-name" }, device.device),
    el("p", {}, `${device.n_events} events, high seq ${device.high_seq}, holes ${device.holes.length}, last gateway ${presence.gateway || "–"}`),
    el("section", { id: "chart" }, el("h3", {}, `Last ${readings.length} readings`), chart(readings)),
    el("section", { id: "shadow" }, el("h3", {}, "Shadow"),
      el("table", {},
        el("tr", {}, el("th", {}, "reported"), el("th", {}, "desired"), el("th", {}, "delta")),
        el("tr", {}, el("td", { id: "reported" }, json(shadow.reported)), el("td", { id: "desired" }, json(shadow.desired)),
          el("td", { id: "delta" }, json(shadow.delta))))),
    el("section", {}, el("h3", {}, "Edit desired state"), form));
}

let rendering = Promise.resolve();
function render() {
  // One render at a time: a stream message during a render waits for it.
  rendering = rendering.then(async () => {
    const match = location.hash.match(/^#\/device\/(.+)$/);
    try {
      if (match) {
        // Keep what the user is typing: a live refresh must not wipe the form.
        const typing = document.activeElement && document.activeElement.name === "patch";
        if (typing) return;
        await renderDevice(decodeURIComponent(match[1]));
      } else {
        await renderFleet();
      }
      document.body.dataset.rendered = String(Date.now());
    } catch (error) {
      view.replaceChildren(el("p", { class: "error" }, `error: ${error.message}`));
    }
  });
  return rendering;
}

function follow() {
  if (!window.EventSource) return;
  const live = document.getElementById("live");
  const stream = new EventSource("/api/events/stream");
  let timer = null;
  stream.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  stream.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "live off"; });
  stream.addEventListener("head", (event) => {
    document.getElementById("head").textContent = `log head ${JSON.parse(event.data).head}`;
    // Projections trail the head by a moment: refresh now and once more shortly after.
    render();
    clearTimeout(timer);
    timer = setTimeout(render, 700);
  });
}

window.addEventListener("hashchange", render);
render();
if (!new URLSearchParams(location.search).has("static")) follow();
