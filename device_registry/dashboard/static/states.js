// State timelines: the device page's non-numeric fields (a thermostat's `mode`, a plug's
// `relay_on`, any string or boolean field of the type) drawn as bands of values over time.
//
// A value holds from its reading until the next one; where readings stop for longer than
// the series' usual spacing allows (3× its median step, as the numeric charts' gaps), the
// band ends one usual step after the last reading and the time without data is left empty:
// a gap, never a band stretched across hours nobody reported. Long ranges use the last value
// per bucket (`fn=last`, `fill=null`): an empty bucket is a gap.
//
// Plain SVG (no library): bands are <rect>s with a <title> (value, from, to) and data-value,
// the axis uses the numeric charts' label formatter and never puts labels closer than the
// widest label plus a gap.

const SVG = "http://www.w3.org/2000/svg";
const BAND_H = 26;
const AXIS_H = 40;
const PAD_X = 8;
const COLORS = ["#0b5cad", "#9a6700", "#1a7f37", "#8250df", "#b42318", "#0f766e", "#57606a", "#bf3989"];
const BOOLEAN_COLORS = { true: "#1a7f37", false: "#8c959f" };
// Tick increments (seconds) the axis may use, smallest first.
const INCREMENTS = [
  1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800,
];

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  for (const child of children) node.append(child);
  return node;
}

const keyOf = (value) => (typeof value === "string" ? value : JSON.stringify(value));

// Bands [{from, to, value}] (epoch seconds) and the number of gaps, from points in time order.
// `stepS` (aggregates) is the bucket width: each non-null bucket is a band of that width.
export function toBands(times, values, stepS = null) {
  const bands = [];
  let gaps = 0;
  if (!times.length) return { bands, gaps };
  let usual = stepS;
  if (usual === null) {
    const steps = [];
    for (let i = 1; i < times.length; i += 1) steps.push(times[i] - times[i - 1]);
    steps.sort((a, b) => a - b);
    usual = steps.length ? Math.max(steps[Math.floor(steps.length / 2)], 0.001) : 1;
  }
  const limit = stepS === null ? Math.max(usual * 3, usual + 2) : stepS * 1.5;
  let open = null;
  let wasGap = false;
  for (let i = 0; i < times.length; i += 1) {
    const t = times[i];
    const value = values[i];
    const next = i + 1 < times.length ? times[i + 1] : null;
    if (value === null || value === undefined) {
      if (open) bands.push(open);
      open = null;
      if (!wasGap && bands.length) gaps += 1;
      wasGap = true;
      continue;
    }
    wasGap = false;
    const to = next !== null && next - t <= limit ? next : t + usual;
    if (open && open.value === value && open.to >= t) open.to = to;
    else {
      if (open) bands.push(open);
      open = { from: t, to, value };
    }
    if (next !== null && next - t > limit) {
      bands.push(open);
      open = null;
      gaps += 1;
    }
  }
  if (open) bands.push(open);
  return { bands, gaps };
}

function ticks(startS, endS, widthPx, minSpacePx) {
  const range = Math.max(endS - startS, 1);
  const incr = INCREMENTS.find((i) => (i / range) * widthPx >= minSpacePx) || INCREMENTS[INCREMENTS.length - 1];
  // Nice ticks in the browser's time zone (what the labels show).
  const offset = -new Date(startS * 1000).getTimezoneOffset() * 60;
  const splits = [];
  for (let t = Math.ceil((startS + offset) / incr) * incr - offset; t <= endS; t += incr) splits.push(t);
  return { splits, incr };
}

// One figure per field; returns {figure, draw(times, values, startS, endS, stepS)}.
export function stateTimeline(kit, { field, kind, enumValues }) {
  const { el, fmtTime, timeTickLabels, textWidth, timeAxisSpace, AXIS_FONT } = kit;
  const box = el("div", { class: "states-plot" });
  const legend = el("ul", { class: "states-legend", "aria-label": `${field} values` });
  const figure = el(
    "figure",
    { class: "chart states", dataset: { field, bands: "0", gaps: "0", kind: "state" }, "aria-label": `${field} over time` },
    el("figcaption", { text: `${field} (state)` }),
    box,
    legend,
  );
  // Stable colours: enum values in catalogue order, booleans fixed, other strings as they come.
  const colours = new Map();
  for (const [i, v] of (enumValues || []).entries()) colours.set(keyOf(v), COLORS[i % COLORS.length]);
  const colourOf = (value) => {
    if (kind === "boolean") return BOOLEAN_COLORS[String(value)] || COLORS[0];
    const key = keyOf(value);
    if (!colours.has(key)) colours.set(key, COLORS[colours.size % COLORS.length]);
    return colours.get(key);
  };

  const draw = (times, values, startS, endS, stepS = null) => {
    const width = Math.max(320, Math.floor(box.clientWidth || figure.clientWidth || 600));
    const plotW = width - 2 * PAD_X;
    const x = (t) => PAD_X + ((Math.min(Math.max(t, startS), endS) - startS) / Math.max(endS - startS, 1)) * plotW;
    const { bands, gaps } = toBands(times, values, stepS);
    const shown = bands.filter((b) => b.to > startS && b.from < endS);
    const root = svg("svg", { width, height: BAND_H + AXIS_H, role: "img", "aria-label": `${field}: ${shown.length} band(s), ${gaps} gap(s)` });
    root.append(svg("rect", { x: PAD_X, y: 0, width: plotW, height: BAND_H, fill: "#f6f7f9", stroke: "#d5d9de" }));
    for (const b of shown) {
      const x0 = x(b.from);
      const w = Math.max(x(b.to) - x0, 1);
      const text = String(b.value);
      const rect = svg("rect", { class: "band", x: x0, y: 1, width: w, height: BAND_H - 2, fill: colourOf(b.value), "data-value": text, "data-from": b.from, "data-to": b.to });
      rect.append(svg("title", {}, `${field} = ${text}\n${fmtTime(b.from * 1000)} → ${fmtTime(b.to * 1000)}`));
      root.append(rect);
      // The value inside the band when it fits; otherwise the tooltip and the legend tell it.
      if (textWidth(text, AXIS_FONT) + 8 <= w) {
        root.append(svg("text", { x: x0 + 4, y: BAND_H / 2 + 4, fill: "#fff", "font-size": 12, "pointer-events": "none" }, text));
      }
    }
    // Time axis: ticks no closer than the widest label plus a gap (as the numeric charts).
    const { splits, incr } = ticks(startS, endS, plotW, timeAxisSpace());
    const labels = timeTickLabels(splits, incr);
    splits.forEach((t, i) => {
      const px = x(t);
      root.append(svg("line", { x1: px, x2: px, y1: BAND_H, y2: BAND_H + 5, stroke: "#59636e" }));
      const lines = labels[i].split("\n");
      const label = svg("text", { class: "tick", x: px, y: BAND_H + 18, "text-anchor": "middle", "font-size": 12, fill: "#1b1f24" });
      lines.forEach((line, k) => label.append(svg("tspan", { x: px, dy: k ? 14 : 0 }, line)));
      root.append(label);
    });
    box.replaceChildren(root);
    const seen = [...new Set(shown.map((b) => keyOf(b.value)))];
    legend.replaceChildren(
      ...(seen.length
        ? seen.map((k) => {
            const value = shown.find((b) => keyOf(b.value) === k).value;
            return el("li", {}, el("span", { class: "swatch", style: `background:${colourOf(value)}` }), String(value));
          })
        : [el("li", { class: "muted", text: "No value in this range." })]),
    );
    figure.dataset.bands = String(shown.length);
    figure.dataset.gaps = String(gaps);
  };
  return { figure, draw };
}

// The device page's state timelines: one per field in `fields`, loaded for the page's range
// (raw readings up to an hour, else the last value per bucket) and kept live like the charts.
export function statePanel(kit, { base, deviceType, fields, container }) {
  const { api, query, fetchRaw, chooseEvery, RAW_MAX_RANGE_S } = kit;
  const props = deviceType.reading_schema.properties || {};
  const defs = deviceType.reading_schema.$defs || {};
  const schemaOf = (f) => {
    const p = props[f] || {};
    return p.$ref ? defs[p.$ref.split("/").pop()] || {} : p;
  };
  const timelines = new Map();
  for (const f of fields) {
    const schema = schemaOf(f);
    const timeline = stateTimeline(kit, { field: f, kind: schema.type, enumValues: schema.enum });
    container.append(timeline.figure);
    timelines.set(f, timeline);
  }
  let view = null; // {raw, startMs, endMs, stepS, times, values: {f: []}, lastMs}

  const drawAll = () => {
    for (const [f, t] of timelines) t.draw(view.times, view.values[f], view.startMs / 1000, view.endMs / 1000, view.stepS);
  };
  const absorb = (points) => {
    for (const p of points) {
      const t = Date.parse(p.time);
      if (view.lastMs !== null && t <= view.lastMs) continue;
      view.times.push(t / 1000);
      for (const f of fields) view.values[f].push(p[f] === undefined ? null : p[f]);
      view.lastMs = t;
    }
  };
  const load = async (rangeS) => {
    const endMs = Date.now();
    const startMs = endMs - rangeS * 1000;
    const next = { raw: rangeS <= RAW_MAX_RANGE_S, startMs, endMs, stepS: null, times: [], values: {}, lastMs: null, loadedAt: endMs };
    for (const f of fields) next.values[f] = [];
    view = next;
    if (view.raw) absorb(await fetchRaw(`${base}/telemetry`, fields, startMs, endMs + 1));
    else {
      const [every, seconds] = chooseEvery(rangeS);
      view.stepS = seconds;
      const body = await api(`${base}/telemetry/aggregate${query({ fields: fields.join(","), start: startMs, end: endMs, every, fn: "last", fill: "null" })}`);
      absorb(body.points);
    }
    drawAll();
  };
  const live = async (rangeS) => {
    if (!view) return;
    if (!view.raw) {
      if (Date.now() - view.loadedAt > 60000) await load(rangeS);
      return;
    }
    absorb(await fetchRaw(`${base}/telemetry`, fields, view.lastMs === null ? view.startMs : view.lastMs + 1, Date.now() + 1));
    view.endMs = Date.now();
    view.startMs = view.endMs - rangeS * 1000;
    let drop = 0;
    while (drop < view.times.length && view.times[drop] < view.startMs / 1000) drop += 1;
    if (drop) {
      view.times.splice(0, drop);
      for (const f of fields) view.values[f].splice(0, drop);
    }
    drawAll(); // the window slides even without new readings
  };
  const resize = () => {
    if (view) drawAll();
  };
  return { load, live, resize };
}
