// iotfleet operator dashboard: one small hand-written module over the public /api/v1.
//
// The server renders each page's shell (layout, forms, labels); this module fills it
// with data fetched with the operator's API key. The key lives in sessionStorage
// (one tab, gone when the tab closes) and travels only in the Authorization header:
// never in a URL, where it would end up in history, logs and Referer headers.
// Data is always inserted as text (textContent), never as HTML.

const KEY_STORAGE = "iotfleet.apiKey";
const POLL_MS = { fleet: 5000, devices: 10000, device: 5000, commandsBusy: 500, alerts: 5000, rules: 10000 };
const TERMINAL = new Set(["succeeded", "failed", "expired"]);
const LIFECYCLE = ["queued", "sent", "delivered"];

// --- API access ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

const apiKey = () => sessionStorage.getItem(KEY_STORAGE);

async function api(path, { method = "GET", body, headers = {}, key = apiKey(), signin = false } = {}) {
  const sent = { Accept: "application/json", ...headers };
  if (key) sent.Authorization = `Bearer ${key}`;
  if (body !== undefined) sent["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new ApiError(0, { title: "Network error", detail: `the registry cannot be reached (${error.message})` });
  }
  if (response.status === 401 && !signin) {
    // The key was revoked or the registry lost it: back to the sign-in page, then here again.
    sessionStorage.removeItem(KEY_STORAGE);
    goSignIn("Your API key was refused; sign in again.");
    throw new ApiError(401, { title: "Unauthorized" });
  }
  if (!response.ok) {
    let problem;
    try {
      problem = await response.json();
    } catch {
      problem = { title: response.statusText || `HTTP ${response.status}` };
    }
    throw new ApiError(response.status, problem);
  }
  return response.status === 204 ? null : response.json();
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    for (const one of Array.isArray(value) ? value : [value]) search.append(name, String(one));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

function explain(error) {
  if (!(error instanceof ApiError)) return String(error);
  if (error.status === 403) return `Your API key's role may not do this (${error.message}).`;
  if (error.status === 503) return `The platform is unavailable right now: ${error.message}`;
  return error.message;
}

// --- small DOM helpers -----------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

const pad2 = (n) => String(n).padStart(2, "0");

// ISO 8601 order in the browser's time zone ("2026-12-01 14:05:09"): never 01/12 vs 12/01.
function isoLocal(date) {
  return (
    `${date.getFullYear()}-${pad2(date.getMonth() + 1)}-${pad2(date.getDate())} ` +
    `${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`
  );
}

function fmtTime(value) {
  if (!value) return "–";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : isoLocal(date);
}

function ago(value) {
  if (!value) return "never";
  const seconds = Math.round((Date.now() - new Date(value).getTime()) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function fmtValue(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(2);
  return String(value);
}

const badge = (text, kind) => el("span", { class: `badge ${kind}`, text });

function flash(message, kind = "error") {
  const box = $("#flash");
  if (!box) return;
  box.textContent = message || "";
  box.className = `flash ${kind === "info" ? "info" : ""}`;
  box.hidden = !message;
}

function setLive(text) {
  const live = $("#live");
  if (live) live.textContent = text;
}

function ready() {
  // Tests and the page-load measurement wait for this: the first data is on screen.
  if (document.body.dataset.state !== "ready") {
    document.body.dataset.state = "ready";
    window.iotfleetReadyAt = performance.now();
  }
}

// A poller that never overlaps itself, pauses while the tab is hidden, and reports
// trouble in the header instead of piling up errors.
function poll(task, everyMs) {
  let timer = null;
  let stopped = false;
  const delay = () => (typeof everyMs === "function" ? everyMs() : everyMs);
  const run = async () => {
    timer = null;
    if (stopped) return;
    if (document.hidden) {
      timer = setTimeout(run, delay());
      return;
    }
    try {
      await task();
      setLive(`Live · updated ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) setLive(`Connection problem: ${explain(error)} · retrying`);
    }
    if (!stopped) timer = setTimeout(run, delay());
  };
  const handle = {
    now() {
      if (timer) clearTimeout(timer);
      return run();
    },
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
  };
  return handle;
}

// --- sign-in ---------------------------------------------------------------------------------

function safeNext(raw) {
  // Only a path of this site: never an absolute or protocol-relative URL (open redirect).
  return raw && raw.startsWith("/") && !raw.startsWith("//") && !raw.startsWith("/\\") ? raw : "/";
}

function goSignIn(message) {
  const next = location.pathname + location.search;
  if (message) sessionStorage.setItem("iotfleet.signinMessage", message);
  location.assign(`/signin${query({ next: next === "/" ? "" : next })}`);
}

function initSignIn() {
  const form = $("#signin-form");
  const input = $("#api-key");
  const error = $("#signin-error");
  const pending = sessionStorage.getItem("iotfleet.signinMessage");
  if (pending) {
    error.textContent = pending;
    sessionStorage.removeItem("iotfleet.signinMessage");
  }
  input.focus();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    input.removeAttribute("aria-invalid");
    if (!key) {
      error.textContent = "Enter an API key.";
      input.setAttribute("aria-invalid", "true");
      return;
    }
    error.textContent = "";
    form.querySelector("button").disabled = true;
    try {
      await api("/api/v1/device-types", { key, signin: true });
      sessionStorage.setItem(KEY_STORAGE, key);
      location.assign(safeNext(new URLSearchParams(location.search).get("next")));
    } catch (failure) {
      input.setAttribute("aria-invalid", "true");
      error.textContent =
        failure instanceof ApiError && failure.status === 401
          ? "This API key was refused by the registry."
          : `Cannot sign in: ${explain(failure)}`;
      form.querySelector("button").disabled = false;
    }
  });
  ready();
}

// --- fleet overview --------------------------------------------------------------------------

async function initFleet() {
  const tbody = $("#types-table tbody");
  const alertsList = $("#recent-alerts");
  const refresh = async () => {
    const [summary, alerts] = await Promise.all([
      api("/api/v1/fleet/summary"),
      api(`/api/v1/alerts${query({ status: "active", limit: 5 })}`),
    ]);
    const totals = { ...summary.totals, offline: summary.totals.devices - summary.totals.online };
    for (const cell of document.querySelectorAll("[data-metric]")) {
      cell.textContent = fmtInt(totals[cell.dataset.metric]);
    }
    tbody.replaceChildren(
      ...summary.types.map((t) =>
        el(
          "tr",
          { dataset: { type: t.device_type } },
          el("th", { scope: "row" }, el("a", { href: `/devices${query({ type: t.device_type })}`, text: t.device_type })),
          ...[
            t.devices,
            t.online,
            t.devices - t.online,
            t.readings_last_minute,
            t.readings_last_hour,
            t.deadlettered_last_hour,
            t.active_alerts,
            t.open_alerts,
          ].map((n) => el("td", { class: "num", text: fmtInt(n) })),
        ),
      ),
    );
    $("#counts-age").textContent = `Telemetry counts from InfluxDB, ${summary.counts_age_s.toFixed(1)} s old; refreshed every ${POLL_MS.fleet / 1000} s.`;
    alertsList.replaceChildren(
      ...(alerts.items.length
        ? alerts.items.map((a) =>
            el(
              "li",
              {},
              el("span", { class: `sev-${a.severity}`, text: a.severity }),
              ` · ${a.rule_name} on `,
              el("a", { href: `/devices/${encodeURIComponent(a.device_id)}`, text: a.device_id }),
              ` · ${a.message} · ${ago(a.raised_at)}`,
            ),
          )
        : [el("li", { class: "muted", text: "No active alert." })]),
    );
    ready();
  };
  poll(refresh, POLL_MS.fleet).now();
}

// --- device list -----------------------------------------------------------------------------

async function loadTypes() {
  const types = await api("/api/v1/device-types");
  return types.items;
}

async function initDevices() {
  const form = $("#device-filters");
  const tbody = $("#devices-table tbody");
  const prev = $("#prev-page");
  const next = $("#next-page");
  const info = $("#page-info");
  const pageSize = 50;
  let cursors = [null]; // cursor of each page seen, for "Previous page"
  let nextCursor = null;

  const params = new URLSearchParams(location.search);
  const typeSelect = $("#f-type");
  const types = await loadTypes();
  for (const t of types) typeSelect.append(el("option", { value: t.name, text: t.name }));
  for (const name of ["q", "type", "online", "enabled", "tag"]) {
    if (params.has(name)) form.elements[name].value = params.get(name);
  }
  if (params.has("deleted")) $("#devices-note").textContent = `Device ${params.get("deleted")} was deleted.`;
  setupProvision(types, () => poller.now());

  const filters = () => {
    const tag = form.elements.tag.value.trim();
    return {
      q: form.elements.q.value.trim(),
      type: form.elements.type.value,
      online: form.elements.online.value,
      enabled: form.elements.enabled.value,
      tag,
    };
  };

  const load = async () => {
    const cursor = cursors[cursors.length - 1];
    let page;
    try {
      page = await api(`/api/v1/devices${query({ ...filters(), limit: pageSize, cursor })}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 422) {
        flash(`Filter refused: ${error.message}`);
        tbody.replaceChildren();
        ready();
        return;
      }
      throw error;
    }
    flash("");
    nextCursor = page.next_cursor;
    tbody.replaceChildren(
      ...(page.items.length
        ? page.items.map((d) =>
            el(
              "tr",
              { dataset: { deviceId: d.id } },
              el("th", { scope: "row" }, el("a", { href: `/devices/${encodeURIComponent(d.id)}`, text: d.id })),
              el("td", { text: d.name || "" }),
              el("td", { text: d.type }),
              el("td", {}, d.online ? badge("online", "ok") : badge("offline", "neutral")),
              el("td", { title: fmtTime(d.last_seen), text: ago(d.last_seen) }),
              el("td", {}, d.enabled ? "yes" : badge("disabled", "warn")),
              el("td", { class: "mono", text: Object.entries(d.tags).map(([k, v]) => `${k}=${v}`).join(" ") }),
            ),
          )
        : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No device matches." }))]),
    );
    prev.disabled = cursors.length <= 1;
    next.disabled = !nextCursor;
    const first = (cursors.length - 1) * pageSize + 1;
    info.textContent = page.items.length ? `Devices ${fmtInt(first)}–${fmtInt(first + page.items.length - 1)}` : "";
    ready();
  };
  const poller = poll(load, POLL_MS.devices);

  const apply = () => {
    const f = filters();
    // Only the filters go into the URL (shareable, back button); never the key.
    history.replaceState(null, "", `/devices${query(f)}`);
    cursors = [null];
    poller.now();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  form.addEventListener("reset", () => setTimeout(apply, 0));
  next.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    poller.now();
  });
  prev.addEventListener("click", () => {
    if (cursors.length > 1) cursors.pop();
    poller.now();
  });
  poller.now();
}

// --- charts (uPlot) --------------------------------------------------------------------------

const PALETTE = ["#0b5cad", "#b42318", "#1a7f37", "#8250df", "#9a6700", "#0f766e"];

function waitForUPlot() {
  // uPlot is a deferred classic script; this module may run first.
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const check = () => {
      if (window.uPlot) resolve(window.uPlot);
      else if (performance.now() - started > 10000) reject(new Error("the chart library did not load"));
      else setTimeout(check, 10);
    };
    check();
  });
}

function chartWidth(container) {
  return Math.max(320, Math.floor(container.clientWidth - 16));
}

// uPlot's axis templates are US-style ("11/27/26 3:06pm"); operators read 24-hour
// clocks and ISO dates, as in the tables.
function fmtDate(template) {
  return window.uPlot.fmtDate(
    template
      .replace("{M}/{D}/{YY}", "{YYYY}-{MM}-{DD}")
      .replace("{M}/{D}", "{MM}-{DD}")
      .replace("{h}{aa}", "{HH}:00")
      .replace(/\{h\}/g, "{HH}")
      .replace(/ ?\{aa\}/g, ""),
  );
}

// A line must not bridge hours without data: where two consecutive points are much further
// apart than the series' usual spacing (its median step), a null is put between them, which
// uPlot draws as a break. Aggregates already carry nulls for empty buckets (fill=null).
function withGaps(times, columns) {
  if (times.length < 3) return { times, columns, gaps: 0 };
  const steps = [];
  for (let i = 1; i < times.length; i += 1) steps.push(times[i] - times[i - 1]);
  const sorted = [...steps].sort((a, b) => a - b);
  const usual = sorted[Math.floor(sorted.length / 2)];
  const limit = Math.max(usual * 3, usual + 2);
  const outTimes = [times[0]];
  const outColumns = columns.map((c) => [c[0]]);
  let gaps = 0;
  for (let i = 1; i < times.length; i += 1) {
    if (steps[i - 1] > limit) {
      outTimes.push(times[i - 1] + usual);
      for (const c of outColumns) c.push(null);
      gaps += 1;
    }
    outTimes.push(times[i]);
    columns.forEach((c, k) => outColumns[k].push(c[i]));
  }
  return { times: outTimes, columns: outColumns, gaps };
}

// Axis labels never overlap, at any width or zoom: uPlot keeps `space` pixels between ticks, so
// the time axis asks for the widest label it can draw (an ISO date) plus a gap, and its labels
// come from one formatter (a time, plus the date on the first tick and where the day changes);
// the value axis is as wide as its widest label.
const AXIS_FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
const AXIS_GAP_PX = 14;
let measureCtx = null;

function textWidth(text, font = AXIS_FONT) {
  measureCtx = measureCtx || document.createElement("canvas").getContext("2d");
  measureCtx.font = font;
  return Math.max(0, ...String(text).split("\n").map((line) => measureCtx.measureText(line).width));
}

const isoDay = (date) => `${date.getFullYear()}-${pad2(date.getMonth() + 1)}-${pad2(date.getDate())}`;

// Labels for tick times (epoch seconds) `incrS` apart: days as dates; hours and minutes as
// HH:MM, seconds as HH:MM:SS, each with the date under the first tick and under a day change.
function timeTickLabels(splits, incrS) {
  let previousDay = null;
  return splits.map((s) => {
    const date = new Date(s * 1000);
    const day = isoDay(date);
    if (incrS >= 86400) return day;
    const clock = incrS >= 60 ? `${pad2(date.getHours())}:${pad2(date.getMinutes())}` : isoLocal(date).slice(11);
    const label = day !== previousDay ? `${clock}\n${day}` : clock;
    previousDay = day;
    return label;
  });
}

const timeAxisSpace = () => Math.ceil(Math.max(textWidth("2026-12-31"), textWidth("00:00:00"))) + AXIS_GAP_PX;

function makeChart(uPlot, container, { title, unit, series, data, markers = false }) {
  const opts = {
    fmtDate,
    width: chartWidth(container),
    height: 220,
    title: undefined,
    cursor: { drag: { x: true, y: false } },
    scales: { x: { time: true } },
    axes: [
      {
        font: AXIS_FONT,
        space: timeAxisSpace,
        values: (_self, splits, _axis, _space, incr) => timeTickLabels(splits, incr),
        size: 48,
      },
      {
        font: AXIS_FONT,
        label: unit || undefined,
        space: 30,
        // ticks (10) + gap (5) + the widest label + a margin; uPlot re-runs it when labels change
        size: (_self, values) => (values && values.length ? Math.ceil(Math.max(...values.map((v) => textWidth(v)))) + 24 : 50),
      },
    ],
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || PALETTE[i % PALETTE.length],
        width: s.points ? 0 : 1.5,
        // A missing stretch of data is a gap in the line (see withGaps); the backtest's line
        // spans the nulls its marker rows put between readings.
        spanGaps: Boolean(s.spanGaps),
        paths: s.points ? () => null : undefined,
        points: s.points ? { show: true, size: 11, width: 2, fill: s.fill || "#fff", stroke: s.color } : { show: false },
      })),
    ],
    legend: { live: true },
  };
  container.replaceChildren();
  const chart = new uPlot(opts, data, container);
  chart.iotfleetTitle = title;
  chart.iotfleetMarkers = markers;
  container.iotfleetChart = chart; // tests measure the axis labels through it
  return chart;
}

// Aggregate automatically when a range holds too many raw points to draw usefully:
// up to 1 h the raw points (the simulator's 1 s interval gives ≤ 3,600), beyond that
// the mean per bucket, the bucket chosen for about 300–700 points.
const EVERY_CHOICES = [
  ["10s", 10], ["30s", 30], ["1m", 60], ["2m", 120], ["5m", 300], ["10m", 600], ["15m", 900],
  ["30m", 1800], ["1h", 3600], ["3h", 10800], ["6h", 21600], ["1d", 86400],
];
const RAW_MAX_RANGE_S = 3600;

function chooseEvery(rangeS) {
  for (const [every, seconds] of EVERY_CHOICES) if (rangeS / seconds <= 720) return [every, seconds];
  return EVERY_CHOICES[EVERY_CHOICES.length - 1];
}

async function fetchRaw(path, fields, startMs, endMs) {
  const points = [];
  let cursor = null;
  // Bounded: 20 pages of 5,000 is far more than an hour of any simulated device.
  for (let page = 0; page < 20; page += 1) {
    const body = await api(`${path}${query({ fields: fields.join(","), start: startMs, end: endMs, limit: 5000, cursor })}`);
    points.push(...body.points);
    cursor = body.next_cursor;
    if (!cursor) break;
  }
  return points;
}

function numericFields(deviceType) {
  const props = deviceType.reading_schema.properties || {};
  return deviceType.fields.filter((f) => ["number", "integer"].includes(props[f]?.type));
}

// --- device page -----------------------------------------------------------------------------

async function initDevice() {
  const deviceId = document.body.dataset.deviceId;
  const base = `/api/v1/devices/${encodeURIComponent(deviceId)}`;
  let device;
  try {
    device = await api(base);
  } catch (error) {
    if (error.status !== 404) {
      flash(`Cannot load the device: ${explain(error)}`);
      ready();
      return;
    }
    // An unknown (or deleted) device: say so in place of the device page, with the way back.
    $("#main").replaceChildren(
      el(
        "section",
        { class: "panel notfound", "aria-labelledby": "notfound-h" },
        el("h1", { id: "notfound-h", text: "Device not found" }),
        el("p", { text: `There is no device ${deviceId}: it may have been deleted, or the link is mistyped.` }),
        el("p", {}, el("a", { href: `/devices${query({ q: deviceId })}`, text: "Search the device list" })),
      ),
    );
    document.title = "Device not found · iotfleet";
    ready();
    return;
  }
  const deviceType = await api(`/api/v1/device-types/${encodeURIComponent(device.type)}`);
  $("#device-title").textContent = device.name ? `${device.name} (${device.id})` : device.id;
  document.title = `${device.id} · iotfleet`;

  const renderPresence = (d) => {
    const facts = [
      ["Status", d.online ? badge("online", "ok") : badge("offline", "neutral")],
      ["Connected since", d.online ? fmtTime(d.connected_since) : "–"],
      ["Last seen", `${ago(d.last_seen)} (${fmtTime(d.last_seen)})`],
      ["Type", d.type],
      ["Enabled", d.enabled ? "yes" : badge("disabled", "warn")],
      ["Tags", Object.entries(d.tags).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
      ["Credentials rotated", fmtTime(d.credentials_rotated_at)],
      ["Registered", fmtTime(d.created_at)],
    ];
    $("#presence").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
  };
  renderPresence(device);
  setupManage(device, base, renderPresence);

  const CAUSES = {
    connected: "connected",
    message: "spoke (telemetry, ack or status)",
    disconnected: "clean disconnect",
    will: "connection lost (will sent)",
    timeout: "keepalive timeout",
    kicked: "disconnected by an operator",
    broker_restart: "registry lost the broker",
    registry_restart: "registry restarted",
  };
  const renderTimeline = (history) => {
    const rows = history.items.map((t) =>
      el(
        "tr",
        { "data-cause": t.cause, "data-online": String(t.online) },
        el("td", { text: fmtTime(t.at), title: t.at }),
        el("td", {}, t.online ? badge("online", "ok") : badge("offline", "neutral")),
        el("td", { text: CAUSES[t.cause] || t.cause, title: t.cause }),
      ),
    );
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "3", class: "muted", text: "No change in the last 24 h." })));
    $("#presence-timeline tbody").replaceChildren(...rows);
  };

  const units = deviceType.units || {};
  const renderLatest = (latest) => {
    $("#latest-table tbody").replaceChildren(
      ...deviceType.fields.map((f) => {
        const entry = latest.fields[f];
        const value = entry ? `${fmtValue(entry.value)}${units[f] ? ` ${units[f]}` : ""}` : "–";
        return el(
          "tr",
          {},
          el("th", { scope: "row", text: f }),
          el("td", { class: "num", text: value }),
          el("td", { text: entry ? ago(entry.time) : "–", title: entry ? fmtTime(entry.time) : "" }),
        );
      }),
    );
  };

  const renderDeadLetters = (summary, own) => {
    const row = summary.types.find((t) => t.device_type === device.type);
    const reasons = Object.entries(own.by_reason)
      .map(([reason, n]) => `${reason} ×${fmtInt(n)}`)
      .join(", ");
    $("#deadletters").textContent = own.items.length
      ? `${fmtInt(own.items.length)} in the last 24 h${own.items.length >= 100 ? " (newest 100)" : ""}: ${reasons}; newest ${ago(own.items[0].time)}.`
      : "None in the last 24 h.";
    $("#deadletters-type").textContent = row
      ? `All ${device.type} devices: ${fmtInt(row.deadlettered_last_hour)} in the last hour.`
      : "";
  };

  // Charts: one per numeric field.
  const uPlot = await waitForUPlot();
  const fields = numericFields(deviceType);
  const chartsBox = $("#charts");
  const figures = new Map();
  for (const f of fields) {
    const plotBox = el("div", { class: "plot" });
    const figure = el(
      "figure",
      { class: "chart", dataset: { field: f, points: "0" }, "aria-label": `${f} over time` },
      el("figcaption", { text: `${f}${units[f] ? ` (${units[f]})` : ""}` }),
      plotBox,
    );
    chartsBox.append(figure);
    figures.set(f, { figure, plotBox, chart: null });
  }
  // Non-numeric fields (a mode, a relay state): state timelines, in a module of their own.
  const stateFields = deviceType.fields.filter((f) => !fields.includes(f));
  const states = stateFields.length
    ? (await loadModule("states.js")).statePanel(kit, { base, deviceType, fields: stateFields, container: chartsBox })
    : null;
  const series = { times: [], values: Object.fromEntries(fields.map((f) => [f, []])) };
  let mode = null; // {raw: bool, every, startMs, endMs}
  let lastMs = null;
  let loading = false;

  const draw = () => {
    for (const f of fields) {
      const slot = figures.get(f);
      const gapped = withGaps(series.times, [series.values[f]]);
      const data = [gapped.times, gapped.columns[0]];
      if (slot.chart) slot.chart.setData(data);
      else slot.chart = makeChart(uPlot, slot.plotBox, { title: f, unit: units[f], series: [{ label: f }], data });
      slot.figure.dataset.points = String(series.times.length);
      // Breaks in the line: inserted gaps plus empty buckets (tests and curious operators read it).
      slot.figure.dataset.gaps = String(gapped.columns[0].filter((v) => v === null).length);
    }
  };
  const absorb = (points) => {
    for (const p of points) {
      const t = Date.parse(p.time);
      if (lastMs !== null && t <= lastMs) continue;
      series.times.push(t / 1000);
      for (const f of fields) series.values[f].push(typeof p[f] === "number" ? p[f] : null);
      lastMs = t;
    }
  };
  const loadRange = async () => {
    loading = true;
    delete chartsBox.dataset.range;
    try {
      await loadRangeNow();
      chartsBox.dataset.range = $("#range").value; // the range on screen (tests wait for it)
    } finally {
      loading = false;
    }
  };
  const loadRangeNow = async () => {
    const rangeS = Number($("#range").value);
    const endMs = Date.now();
    const startMs = endMs - rangeS * 1000;
    series.times = [];
    for (const f of fields) series.values[f] = [];
    lastMs = null;
    // In parallel with the charts' request; its error is rethrown where it is awaited (never unhandled).
    const statesLoaded = states ? states.load(rangeS).catch((err) => err) : null;
    if (!fields.length) {
      if (!states) chartsBox.replaceChildren(el("p", { class: "muted", text: "This device type has no field to chart." }));
      const statesError = await statesLoaded;
      if (statesError instanceof Error) throw statesError;
      return;
    }
    if (rangeS <= RAW_MAX_RANGE_S) {
      mode = { raw: true, startMs };
      absorb(await fetchRaw(`${base}/telemetry`, fields, startMs, endMs + 1));
      $("#chart-mode").textContent = "raw readings, live";
    } else {
      const [every] = chooseEvery(rangeS);
      mode = { raw: false, every, startMs, loadedAt: Date.now() };
      const body = await api(
        `${base}/telemetry/aggregate${query({ fields: fields.join(","), start: startMs, end: endMs, every, fn: "mean", fill: "null" })}`,
      );
      absorb(body.points);
      $("#chart-mode").textContent = `mean per ${every} (aggregated for the long range)`;
    }
    draw();
    const statesError = await statesLoaded;
    if (statesError instanceof Error) throw statesError;
  };
  const liveCharts = async () => {
    if (loading) return; // the full load in progress brings the points
    if (states) await states.live(Number($("#range").value));
    if (!fields.length || !mode) return;
    if (mode.raw) {
      const since = lastMs === null ? mode.startMs : lastMs + 1;
      const before = series.times.length;
      absorb(await fetchRaw(`${base}/telemetry`, fields, since, Date.now() + 1));
      // Keep the window sliding: drop points older than the range.
      const cutoff = (Date.now() - Number($("#range").value) * 1000) / 1000;
      let drop = 0;
      while (drop < series.times.length && series.times[drop] < cutoff) drop += 1;
      if (drop) {
        series.times.splice(0, drop);
        for (const f of fields) series.values[f].splice(0, drop);
      }
      if (series.times.length !== before || drop) draw();
    } else if (Date.now() - mode.loadedAt > 60000) {
      await loadRange(); // aggregated views move slowly: a full reload each minute
    }
  };

  window.addEventListener("resize", () => {
    for (const { chart, plotBox } of figures.values()) if (chart) chart.setSize({ width: chartWidth(plotBox), height: 220 });
    states?.resize();
  });
  $("#range").addEventListener("change", async () => {
    try {
      await loadRange();
    } catch (error) {
      flash(`Cannot load telemetry: ${explain(error)}`);
    }
  });

  // Commands: a form generated from the type's command JSON schemas.
  setupCommandForm(deviceType, base);
  const commandsTable = $("#commands-table tbody");
  let busy = false;
  const refreshCommands = async () => {
    const page = await api(`${base}/commands${query({ limit: 20 })}`);
    busy = page.items.some((c) => !TERMINAL.has(c.status));
    commandsTable.replaceChildren(
      ...(page.items.length
        ? page.items.map(commandRow)
        : [el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No command sent to this device yet." }))]),
    );
  };
  document.addEventListener("iotfleet:command-sent", () => {
    busy = true;
    commandPoller.now();
  });
  // While a command is in flight its lifecycle is followed twice a second.
  const commandPoller = poll(refreshCommands, () => (busy ? POLL_MS.commandsBusy : POLL_MS.device));

  const refresh = async () => {
    const [d, latest, summary, own, history] = await Promise.all([
      api(base),
      api(`${base}/telemetry/latest`),
      api("/api/v1/fleet/summary"),
      api(`${base}/deadletters`),
      api(`${base}/presence${query({ start: "-24h", order: "desc", limit: 50 })}`),
    ]);
    renderPresence(d);
    renderTimeline(history);
    renderLatest(latest);
    renderDeadLetters(summary, own);
    await liveCharts();
  };
  // Everything at once: the page is on screen after the slowest request, not after their sum.
  const refreshPoller = poll(refresh, POLL_MS.device);
  await Promise.all([
    loadRange().catch((error) => flash(`Cannot load telemetry: ${explain(error)}`)),
    commandPoller.now(),
    refreshPoller.now(),
  ]);
  ready();
}

function commandRow(c) {
  const steps = [...LIFECYCLE, TERMINAL.has(c.status) ? c.status : "succeeded"];
  const reached = TERMINAL.has(c.status) ? steps.length - 1 : Math.max(0, LIFECYCLE.indexOf(c.status));
  const times = { queued: c.created_at, sent: c.sent_at, delivered: c.delivered_at };
  const lifecycle = el(
    "ol",
    { class: "lifecycle", "aria-label": `Lifecycle: ${c.status}` },
    steps.map((step, i) => {
      const classes = [];
      if (i < reached) classes.push("done");
      if (i === reached) classes.push("current", TERMINAL.has(step) && TERMINAL.has(c.status) ? step : "pending");
      return el("li", {
        class: classes.join(" "),
        "aria-current": i === reached ? "step" : undefined,
        title: times[step] ? fmtTime(times[step]) : c.completed_at && TERMINAL.has(step) ? fmtTime(c.completed_at) : "",
        text: i === steps.length - 1 && !TERMINAL.has(c.status) ? "done?" : step,
      });
    }),
  );
  return el(
    "tr",
    { dataset: { commandId: c.id, status: c.status } },
    el("td", { text: fmtTime(c.created_at) }),
    el("td", { class: "mono", text: c.name }),
    el("td", { class: "mono", text: JSON.stringify(c.args) }),
    el("td", { text: c.source }),
    el("td", {}, lifecycle, el("span", { class: "visually-hidden", text: c.status })),
    el("td", { text: c.detail || "" }),
  );
}

function resolveRef(schema, root) {
  // Pydantic puts enums and nested models under $defs; follow local refs only.
  if (schema && schema.$ref && schema.$ref.startsWith("#/$defs/")) return root.$defs?.[schema.$ref.slice(8)] || {};
  if (schema && Array.isArray(schema.allOf) && schema.allOf.length === 1) return resolveRef(schema.allOf[0], root);
  return schema || {};
}

function argInput(name, prop, required, root) {
  const schema = resolveRef(prop, root);
  const id = `arg-${name}`;
  const help = [schema.description, schema.minimum !== undefined ? `min ${schema.minimum}` : null, schema.maximum !== undefined ? `max ${schema.maximum}` : null]
    .filter(Boolean)
    .join(" · ");
  let input;
  if (Array.isArray(schema.enum)) {
    input = el("select", { id, name }, schema.enum.map((v) => el("option", { value: v, text: v })));
  } else if (schema.type === "boolean") {
    input = el("select", { id, name, dataset: { kind: "boolean" } }, el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
  } else if (schema.type === "integer" || schema.type === "number") {
    input = el("input", {
      id,
      name,
      type: "number",
      min: schema.minimum ?? schema.exclusiveMinimum,
      max: schema.maximum ?? schema.exclusiveMaximum,
      step: schema.type === "integer" ? 1 : "any",
      required,
      dataset: { kind: schema.type },
    });
    if (schema.default !== undefined) input.value = schema.default;
  } else {
    input = el("input", { id, name, type: "text", required, maxlength: schema.maxLength });
    if (schema.default !== undefined) input.value = schema.default;
  }
  if (help) input.setAttribute("title", help);
  return el("div", {}, el("label", { for: id, text: `${schema.title || name}${required ? "" : " (optional)"}` }), input);
}

function credentialsBox(title, credentials) {
  // Shown once: the registry keeps no password. Selectable text, never put in a URL or storage.
  if (credentials.auth === "certificate") {
    // A certificate device: its certificate, and its private key when the registry generated it.
    return el(
      "div",
      { class: "credentials", "aria-label": title },
      el("p", { text: `${title} — copy the certificate and key now, the key is not shown again:` }),
      el(
        "dl",
        { class: "facts" },
        el("dt", { text: "Client id (= certificate CN)" }),
        el("dd", {}, el("code", { text: credentials.client_id })),
        el("dt", { text: "Certificate" }),
        el("dd", {}, el("code", { class: "secret", text: credentials.certificate || "" })),
        el("dt", { text: "Private key" }),
        el("dd", {}, el("code", { class: "secret", text: credentials.private_key || "(kept by the device: CSR)" })),
      ),
    );
  }
  return el(
    "div",
    { class: "credentials", "aria-label": title },
    el("p", { text: `${title} — copy the password now, it is not shown again:` }),
    el(
      "dl",
      { class: "facts" },
      el("dt", { text: "Username / client id" }),
      el("dd", {}, el("code", { text: credentials.username })),
      el("dt", { text: "Password" }),
      el("dd", {}, el("code", { class: "secret", text: credentials.password })),
    ),
  );
}

function setupManage(device, base, renderPresence) {
  const toggle = $("#device-toggle");
  const result = $("#manage-result");
  let current = device;
  const label = () => {
    toggle.textContent = current.enabled ? "Disable" : "Enable";
    toggle.setAttribute("aria-label", `${current.enabled ? "Disable" : "Enable"} device ${current.id}`);
  };
  label();
  const run = async (button, action) => {
    button.disabled = true;
    result.replaceChildren();
    try {
      await action();
    } catch (failure) {
      result.replaceChildren(el("p", { class: "error", text: explain(failure) }));
    } finally {
      button.disabled = button.dataset.roleLocked === "true";
    }
  };
  toggle.addEventListener("click", () =>
    run(toggle, async () => {
      current = await api(`${base}/${current.enabled ? "disable" : "enable"}`, { method: "POST" });
      renderPresence(current);
      label();
      result.replaceChildren(el("p", { text: current.enabled ? "Enabled: the device may connect again." : "Disabled: its connection was closed." }));
    }),
  );
  $("#device-rotate").addEventListener("click", (event) =>
    run(event.currentTarget, async () => {
      if (!window.confirm(`Rotate the credentials of ${current.id}? Its current password stops working at once.`)) return;
      const rotated = await api(`${base}/rotate-credentials`, { method: "POST" });
      result.replaceChildren(credentialsBox("New credentials", rotated.credentials));
    }),
  );
  $("#device-delete").addEventListener("click", (event) =>
    run(event.currentTarget, async () => {
      if (!window.confirm(`Delete ${current.id}? Its broker account goes and it is disconnected.`)) return;
      await api(base, { method: "DELETE" });
      location.assign(`/devices${query({ deleted: current.id })}`);
    }),
  );
}

function parseTags(text) {
  const tags = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at < 1) throw new Error(`tag ${JSON.stringify(part)} is not key=value`);
    tags[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return tags;
}

function setupProvision(types, onCreated) {
  const form = $("#provision-form");
  if (!form) return;
  const error = $("#provision-error");
  const result = $("#provision-result");
  $("#p-type").replaceChildren(...types.map((t) => el("option", { value: t.name, text: t.name })));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    result.replaceChildren();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const body = { type: form.elements.type.value, tags: parseTags(form.elements.tags.value) };
      if (form.elements.id.value.trim()) body.id = form.elements.id.value.trim();
      if (form.elements.name.value.trim()) body.name = form.elements.name.value.trim();
      const created = await api("/api/v1/devices", { method: "POST", body });
      result.replaceChildren(
        el("p", {}, "Provisioned ", el("a", { href: `/devices/${encodeURIComponent(created.id)}`, text: created.id }), "."),
        credentialsBox(`Credentials of ${created.id}`, created.credentials),
      );
      form.reset();
      onCreated();
    } catch (failure) {
      error.replaceChildren(failure instanceof ApiError ? problemText(failure) : failure.message);
    } finally {
      button.disabled = button.dataset.roleLocked === "true";
    }
  });
}

function setupCommandForm(deviceType, base) {
  const form = $("#command-form");
  const nameSelect = $("#command-name");
  const argsBox = $("#command-args");
  const error = $("#command-error");
  const schemas = deviceType.command_schemas || {};
  nameSelect.replaceChildren(...Object.keys(schemas).map((n) => el("option", { value: n, text: n })));
  const renderArgs = () => {
    const schema = schemas[nameSelect.value] || {};
    const required = new Set(schema.required || []);
    const props = Object.entries(schema.properties || {});
    argsBox.replaceChildren(
      el("legend", { text: "Arguments" }),
      ...(props.length ? props.map(([n, p]) => argInput(n, p, required.has(n), schema)) : [el("p", { class: "muted", text: "No argument." })]),
    );
  };
  nameSelect.addEventListener("change", renderArgs);
  renderArgs();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    for (const bad of form.querySelectorAll("[aria-invalid]")) bad.removeAttribute("aria-invalid");
    const args = {};
    for (const input of argsBox.querySelectorAll("input, select")) {
      if (input.value === "") continue;
      const kind = input.dataset.kind;
      args[input.name] = kind === "integer" || kind === "number" ? Number(input.value) : kind === "boolean" ? input.value === "true" : input.value;
    }
    const ttl = $("#command-ttl").value;
    const button = $("#command-send");
    button.disabled = true;
    try {
      // A fresh Idempotency-Key per submission: a retried request cannot send twice.
      const created = await api(`${base}/commands`, {
        method: "POST",
        body: { name: nameSelect.value, args, ...(ttl ? { ttl_s: Number(ttl) } : {}) },
        headers: { "Idempotency-Key": crypto.randomUUID() },
      });
      form.dataset.lastCommandId = created.id;
      flash(`Command ${created.name} ${created.status}; its lifecycle is shown below.`, "info");
      document.dispatchEvent(new CustomEvent("iotfleet:command-sent"));
    } catch (failure) {
      error.replaceChildren(problemText(failure));
      for (const e of failure.problem?.errors || []) {
        const field = String(e.field || "").split(".").pop();
        const input = argsBox.querySelector(`[name="${CSS.escape(field)}"]`);
        if (input) input.setAttribute("aria-invalid", "true");
      }
    } finally {
      button.disabled = button.dataset.roleLocked === "true";
    }
  });
}

function problemText(failure) {
  const errors = failure instanceof ApiError ? failure.problem?.errors : null;
  if (!errors || !errors.length) return document.createTextNode(explain(failure));
  return el(
    "div",
    {},
    el("p", { text: failure.problem.title || "Invalid" }),
    el("ul", {}, errors.map((e) => el("li", {}, el("code", { text: e.field || "" }), `: ${e.message}`))),
  );
}

// --- alerts ----------------------------------------------------------------------------------

async function initAlerts() {
  const form = $("#alert-filters");
  const tbody = $("#alerts-table tbody");
  const more = $("#alerts-more");
  const params = new URLSearchParams(location.search);
  try {
    const rules = await api(`/api/v1/rules${query({ limit: 1000 })}`);
    for (const r of rules.items) $("#a-rule").append(el("option", { value: r.id, text: r.name }));
  } catch (error) {
    flash(`Cannot list rules for the filter: ${explain(error)}`);
  }
  for (const name of ["state", "severity", "device_id", "rule_id"]) {
    if (params.has(name)) form.elements[name].value = params.get(name);
  }
  let shown = 100;
  const filters = () => {
    const state = form.elements.state.value;
    return {
      status: ["active", "acknowledged", "cleared"].includes(state) ? state : "",
      open: state === "open" ? "true" : "",
      severity: form.elements.severity.value,
      device_id: form.elements.device_id.value.trim(),
      rule_id: form.elements.rule_id.value,
    };
  };
  const acknowledge = async (alert, button) => {
    button.disabled = true;
    try {
      await api(`/api/v1/alerts/${encodeURIComponent(alert.id)}/acknowledge`, { method: "POST" });
      flash(`Alert of ${alert.rule_name} on ${alert.device_id} acknowledged.`, "info");
    } catch (failure) {
      flash(`Cannot acknowledge: ${explain(failure)}`);
    }
    await poller.now();
  };
  const load = async () => {
    const page = await api(`/api/v1/alerts${query({ ...filters(), limit: shown })}`);
    more.hidden = !page.next_cursor;
    tbody.replaceChildren(
      ...(page.items.length
        ? page.items.map((a) => {
            const state = { active: badge("active", "bad"), acknowledged: badge("acknowledged", "warn"), cleared: badge("cleared", "neutral") }[a.status];
            const action =
              a.status === "active"
                ? el("button", { type: "button", class: "small", "aria-label": `Acknowledge ${a.rule_name} on ${a.device_id}`, text: "Acknowledge", dataset: { needsRole: "operator" } })
                : null;
            if (action) action.addEventListener("click", () => acknowledge(a, action));
            return el(
              "tr",
              { dataset: { alertId: a.id, status: a.status } },
              el("td", { text: fmtTime(a.raised_at) }),
              el("td", { class: `sev-${a.severity}`, text: a.severity }),
              el("td", { text: a.rule_name }),
              el("td", {}, el("a", { href: `/devices/${encodeURIComponent(a.device_id)}`, text: a.device_id })),
              el("td", { text: a.message }),
              el("td", {}, state || a.status, a.cleared_at ? ` ${ago(a.cleared_at)}` : ""),
              el("td", { text: a.acknowledged_at ? `${a.acknowledged_by || "?"}, ${ago(a.acknowledged_at)}` : "–" }),
              el("td", {}, action),
            );
          })
        : [el("tr", {}, el("td", { colspan: 8, class: "muted", text: "No alert matches." }))]),
    );
    ready();
  };
  const poller = poll(load, POLL_MS.alerts);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const state = form.elements.state.value;
    const f = filters();
    history.replaceState(null, "", `/alerts${query({ state, severity: f.severity, device_id: f.device_id, rule_id: f.rule_id })}`);
    shown = 100;
    poller.now();
  });
  more.addEventListener("click", () => {
    shown = Math.min(shown + 100, 1000);
    poller.now();
  });
  poller.now();
}

// --- rules -----------------------------------------------------------------------------------

const RULE_EXAMPLE = {
  name: "thermostat-overheat",
  scope: { device_type: "thermostat" },
  when: { field: "temperature_c", op: ">", value: 30, for: "10s" },
  clear_when: { field: "temperature_c", op: "<", value: 26 },
  then: [
    { command: "set_mode", args: { mode: "cool" } },
    { alert: { severity: "major", message: "overheating" } },
  ],
  cooldown: "60s",
};

function conditionField(condition) {
  if (!condition) return null;
  if (condition.field) return condition.field;
  for (const part of condition.all || condition.any || []) {
    const found = conditionField(part);
    if (found) return found;
  }
  return null;
}

function summarizeWhen(rule) {
  if (rule.schedule) return `schedule ${rule.schedule.cron}`;
  return JSON.stringify(rule.when);
}

function summarizeThen(rule) {
  return (rule.then || [])
    .map((a) => (a.command ? `command ${a.command}` : a.alert ? `alert (${a.alert.severity || "major"})` : JSON.stringify(a)))
    .join(", ");
}

async function initRules() {
  const tbody = $("#rules-table tbody");
  const textarea = $("#rule-json");
  const errors = $("#rule-errors");
  textarea.value = JSON.stringify(RULE_EXAMPLE, null, 2);
  let rulesById = new Map();
  const editor = (await loadModule("rules_edit.js")).ruleEditor(kit, { onChanged: () => poller.now() });

  const setEnabled = async (rule, enabled, button) => {
    button.disabled = true;
    try {
      await api(`/api/v1/rules/${encodeURIComponent(rule.id)}/${enabled ? "enable" : "disable"}`, { method: "POST" });
      flash(`Rule ${rule.name} ${enabled ? "enabled" : "disabled"}.`, "info");
    } catch (failure) {
      flash(`Cannot change ${rule.name}: ${explain(failure)}`);
    }
    await poller.now();
  };

  const load = async () => {
    const page = await api(`/api/v1/rules${query({ limit: 1000 })}`);
    rulesById = new Map(page.items.map((r) => [r.id, r]));
    tbody.replaceChildren(
      ...(page.items.length
        ? page.items.map((r) => {
            const toggle = el("button", {
              type: "button",
              class: "small secondary",
              "aria-label": `${r.enabled ? "Disable" : "Enable"} rule ${r.name}`,
              text: r.enabled ? "Disable" : "Enable",
              dataset: { needsRole: "admin" },
            });
            toggle.addEventListener("click", () => setEnabled(r, !r.enabled, toggle));
            const backtest = el("button", { type: "button", class: "small", "aria-label": `Backtest rule ${r.name}`, text: "Backtest" });
            backtest.addEventListener("click", () => openBacktest(r));
            const edit = el("button", { type: "button", class: "small secondary", "aria-label": `Edit rule ${r.name}`, text: "Edit", dataset: { needsRole: "admin" } });
            edit.addEventListener("click", () => editor.edit(r));
            const remove = el("button", { type: "button", class: "small danger", "aria-label": `Delete rule ${r.name}`, text: "Delete", dataset: { needsRole: "admin" } });
            remove.addEventListener("click", () => editor.remove(r, remove));
            return el(
              "tr",
              { dataset: { ruleId: r.id, enabled: String(r.enabled) } },
              el("th", { scope: "row", text: r.name }),
              el("td", { text: r.scope.device_type }),
              el("td", { class: "mono", text: summarizeWhen(r) }),
              el("td", { text: summarizeThen(r) }),
              el("td", {}, r.enabled ? badge("enabled", "ok") : badge("disabled", "neutral")),
              el("td", { class: "num", text: r.version }),
              el("td", { class: "actions" }, toggle, edit, backtest, remove),
            );
          })
        : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No rule yet: create one below." }))]),
    );
    ready();
  };
  const poller = poll(load, POLL_MS.rules);

  $("#rule-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    errors.replaceChildren();
    textarea.removeAttribute("aria-invalid");
    let body;
    try {
      body = JSON.parse(textarea.value);
    } catch (failure) {
      textarea.setAttribute("aria-invalid", "true");
      errors.replaceChildren(el("p", { text: `Not valid JSON: ${failure.message}` }));
      return;
    }
    try {
      const created = await api("/api/v1/rules", { method: "POST", body });
      flash(`Rule ${created.name} created (version ${created.version}).`, "info");
      await poller.now();
    } catch (failure) {
      textarea.setAttribute("aria-invalid", "true");
      errors.replaceChildren(problemText(failure));
    }
  });

  // Backtest: firings as markers over the rule's field for one device.
  const section = $("#backtest");
  let current = null;
  let lastResult = null;
  const openBacktest = (rule) => {
    current = rule;
    lastResult = null;
    section.hidden = false;
    $("#backtest-h").textContent = `Backtest of ${rule.name}`;
    $("#bt-device").replaceChildren();
    $("#backtest-summary").textContent = "";
    $("#backtest-chart").replaceChildren();
    $("#firings-table tbody").replaceChildren();
    section.scrollIntoView();
    runBacktest();
  };
  const runBacktest = async () => {
    if (!current) return;
    const rangeS = Number($("#bt-range").value);
    const end = new Date();
    const start = new Date(end.getTime() - rangeS * 1000);
    $("#backtest-summary").textContent = "Running…";
    section.dataset.state = "running";
    try {
      const result = await api(
        `/api/v1/rules/${encodeURIComponent(current.id)}/backtest${query({ start: start.toISOString(), end: end.toISOString() })}`,
        { method: "POST" },
      );
      lastResult = { result, startMs: start.getTime(), endMs: end.getTime() };
      const fired = result.firings.filter((f) => f.kind === "fire").length;
      $("#backtest-summary").textContent =
        `${fmtInt(result.readings)} readings of ${fmtInt(result.devices)} device(s): ${fired} firing(s), ` +
        `${result.firings.length - fired} clear/schedule event(s).${result.notes.length ? ` ${result.notes.join(" ")}` : ""}`;
      const devices = [...new Set(result.firings.map((f) => f.device_id).filter(Boolean))];
      const select = $("#bt-device");
      const previous = select.value;
      select.replaceChildren(...devices.map((d) => el("option", { value: d, text: d })));
      if (devices.includes(previous)) select.value = previous;
      $("#firings-table tbody").replaceChildren(
        ...result.firings.slice(0, 200).map((f) =>
          el(
            "tr",
            { dataset: { kind: f.kind } },
            el("td", { text: fmtTime(f.at) }),
            el("td", { text: f.device_id || "–" }),
            el("td", { text: f.kind }),
            el("td", { class: "mono", text: JSON.stringify(f.values) }),
            el("td", { class: "mono", text: f.actions.map((a) => JSON.stringify(a)).join(" ") }),
          ),
        ),
      );
      await drawBacktest();
    } catch (failure) {
      $("#backtest-summary").textContent = `Backtest failed: ${explain(failure)}`;
    } finally {
      section.dataset.state = "done";
    }
  };
  const drawBacktest = async () => {
    const box = $("#backtest-chart");
    const field = conditionField(current.when);
    const deviceId = $("#bt-device").value;
    if (!lastResult || !field || !deviceId) {
      box.replaceChildren(el("p", { class: "muted", text: field ? "No firing to show in this range." : "This rule has no field to chart." }));
      return;
    }
    const { result, startMs, endMs } = lastResult;
    const path = `/api/v1/devices/${encodeURIComponent(deviceId)}/telemetry`;
    const rangeS = (endMs - startMs) / 1000;
    let points;
    if (rangeS <= RAW_MAX_RANGE_S) points = await fetchRaw(path, [field], startMs, endMs);
    else {
      const [every] = chooseEvery(rangeS);
      points = (await api(`${path}/aggregate${query({ fields: field, start: startMs, end: endMs, every, fn: "mean", fill: "none" })}`)).points;
    }
    // One x axis for the line and the markers: merge the firing times into it.
    const rows = new Map();
    for (const p of points) rows.set(Date.parse(p.time), [typeof p[field] === "number" ? p[field] : null, null, null]);
    const mine = result.firings.filter((f) => f.device_id === deviceId);
    for (const f of mine) {
      const row = rows.get(f.at_ms) || [null, null, null];
      const y = typeof f.values[field] === "number" ? f.values[field] : row[0];
      if (f.kind === "fire") row[1] = y;
      else row[2] = y;
      rows.set(f.at_ms, row);
    }
    const times = [...rows.keys()].sort((a, b) => a - b);
    const data = [times.map((t) => t / 1000), ...[0, 1, 2].map((i) => times.map((t) => rows.get(t)[i]))];
    const uPlot = await waitForUPlot();
    const plotBox = el("div", { class: "plot" });
    const figure = el(
      "figure",
      { class: "chart", dataset: { markers: String(mine.length) }, "aria-label": `${field} of ${deviceId} with the rule's firings` },
      el("figcaption", { text: `${field} of ${deviceId}: ● fired, ■ cleared (${mine.length} marker(s))` }),
      plotBox,
    );
    box.replaceChildren(figure);
    makeChart(uPlot, plotBox, {
      title: field,
      series: [
        { label: field, spanGaps: true },
        { label: "fired", points: true, color: "#b42318", fill: "#b42318" },
        { label: "cleared", points: true, color: "#1a7f37", fill: "#fff" },
      ],
      data,
      markers: true,
    });
  };
  $("#backtest-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runBacktest();
  });
  $("#bt-device").addEventListener("change", () => drawBacktest().catch((failure) => flash(explain(failure))));
  poller.now();
}

// --- what the caller's role may do ----------------------------------------------------------

// Controls marked data-needs-role="operator|admin" are disabled, with the reason as a tooltip,
// for a key whose role is lower: the API would refuse them anyway (403), so they are not offered.
const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };
let callerRole = null;

function applyRoles() {
  if (!callerRole) return;
  for (const node of document.querySelectorAll("[data-needs-role]:not([data-role-checked])")) {
    node.dataset.roleChecked = "true";
    const needed = node.dataset.needsRole;
    if ((ROLE_RANK[callerRole] ?? -1) >= (ROLE_RANK[needed] ?? 99)) continue;
    node.disabled = true;
    node.dataset.roleLocked = "true";
    node.setAttribute("aria-disabled", "true");
    node.title = `Needs an ${needed} API key; this one is a ${callerRole} key`;
  }
}

async function loadRole() {
  try {
    const me = await api("/api/v1/api-keys/me");
    callerRole = me.role;
    document.body.dataset.role = me.role;
    $("#signout")?.setAttribute("title", `Signed in with ${me.name} (${me.role})`);
  } catch {
    return; // an older registry without /me: every control stays offered, the API still decides
  }
  applyRoles();
  // Rows and forms rendered later (tables, command arguments) get the same treatment.
  new MutationObserver(applyRoles).observe(document.body, { subtree: true, childList: true });
}

// --- pages and panels in modules of their own ------------------------------------------------

// Later pages and panels live in files of their own, each exporting functions that take this
// kit: the one copy of the API client, DOM helpers, poller and chart helpers. Imported with
// this module's ?v= so that a release never mixes versions.
const kit = {
  api, ApiError, query, explain, $, el, badge, flash, fmtTime, fmtInt, ago, poll, ready, problemText,
  fetchRaw, chooseEvery, RAW_MAX_RANGE_S, timeTickLabels, timeAxisSpace, textWidth, AXIS_FONT,
  argInput, parseTags,
};

function loadModule(name) {
  return import(`./${name}${new URL(import.meta.url).search}`);
}

// --- start -----------------------------------------------------------------------------------

const PAGES = {
  fleet: initFleet,
  devices: initDevices,
  alerts: initAlerts,
  rules: initRules,
  apikeys: async () => (await loadModule("api_keys.js")).initApiKeys(kit),
  jobs: async () => (await loadModule("jobs.js")).initJobs(kit),
  channels: async () => (await loadModule("channels.js")).initChannels(kit),
  notfound: ready,
};

function start() {
  const page = document.body.dataset.page;
  if (page === "signin") return initSignIn();
  if (!apiKey()) return goSignIn();
  $("#signout")?.addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    location.assign("/signin");
  });
  loadRole();
  const init = document.body.dataset.deviceId ? initDevice : PAGES[page];
  return Promise.resolve(init()).catch((error) => {
    if (!(error instanceof ApiError && error.status === 401)) flash(`Cannot load this page: ${explain(error)}`);
    ready();
  });
}

start();
