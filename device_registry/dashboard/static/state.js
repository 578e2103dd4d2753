// Device page: the device shadow panel. Desired / reported / delta from
// GET /api/v1/devices/{id}/state, and a form that changes the desired state with
// PATCH …/state/desired (a JSON merge patch; If-Match on the version read, so an
// edit made meanwhile by someone else is never overwritten silently).
//
// A module of its own next to app.js: it reads the same session key, writes text only
// (textContent), and marks its save button data-needs-role="operator" so app.js's role
// check disables it for a viewer key.

const KEY_STORAGE = "iotfleet.apiKey";
const POLL_MS = 3000;

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

async function call(path, { method = "GET", body, headers = {} } = {}) {
  const sent = { Accept: "application/json", Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE)}`, ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/merge-patch+json";
  const response = await fetch(path, {
    method,
    headers: sent,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = { detail: response.statusText };
  }
  return { status: response.status, ok: response.ok, etag: response.headers.get("ETag"), data };
}

const fmt = (value) => (value === undefined ? "–" : JSON.stringify(value));
const fmtTime = (value) => (value ? new Date(value).toLocaleString("en-GB") : "never");

// The JSON schema of a state field: its non-null alternative (the models make every field optional).
function fieldSchema(prop) {
  const choices = prop.anyOf ? prop.anyOf.filter((p) => p.type !== "null") : [prop];
  return { ...choices[0], description: prop.description, title: prop.title };
}

function control(name, schema) {
  const id = `state-field-${name}`;
  let input;
  if (schema.enum || schema.type === "boolean") {
    const values = schema.enum || [true, false];
    input = el("select", { id, name }, el("option", { value: "", text: "(not set)" }));
    for (const v of values) input.append(el("option", { value: JSON.stringify(v), text: String(v) }));
  } else {
    input = el("input", {
      id,
      name,
      type: "number",
      min: schema.minimum,
      max: schema.maximum,
      step: schema.type === "integer" ? "1" : "any",
      placeholder: "(not set)",
    });
  }
  return el("div", {}, el("label", { for: id, text: name, title: schema.description || "" }), input);
}

function readControl(name, schema) {
  const input = document.getElementById(`state-field-${name}`);
  if (input.value === "") return undefined;
  if (input.tagName === "SELECT") return JSON.parse(input.value);
  return schema.type === "integer" ? parseInt(input.value, 10) : Number(input.value);
}

function writeControl(name, value) {
  const input = document.getElementById(`state-field-${name}`);
  if (input.tagName === "SELECT") input.value = value === undefined ? "" : JSON.stringify(value);
  else input.value = value === undefined ? "" : String(value);
  input.removeAttribute("aria-invalid");
}

async function init() {
  const panel = $("#state-panel");
  const deviceId = document.body.dataset.deviceId;
  if (!panel || !deviceId || !sessionStorage.getItem(KEY_STORAGE)) return;
  const base = `/api/v1/devices/${encodeURIComponent(deviceId)}`;
  const device = await call(base);
  if (!device.ok) {
    panel.hidden = true;
    return;
  }
  const type = await call(`/api/v1/device-types/${encodeURIComponent(device.data.type)}`);
  if (!type.ok || !type.data.state_schema) {
    $("#state-summary").textContent = `A ${device.data.type} has no configurable state.`;
    $("#state-form").hidden = true;
    panel.dataset.panelState = "ready";
    return;
  }
  const fields = Object.entries(type.data.state_schema.properties).map(([name, prop]) => [name, fieldSchema(prop)]);
  $("#state-fields").replaceChildren(...fields.map(([name, schema]) => control(name, schema)));
  let current = null;
  let etag = null;
  let dirty = false;
  $("#state-form").addEventListener("input", () => {
    dirty = true;
  });

  const render = (state, tag) => {
    current = state;
    etag = tag;
    const rows = fields.map(([name]) => {
      const wanted = state.desired[name];
      const pending = name in state.delta;
      const status =
        wanted === undefined
          ? el("span", { class: "badge neutral", text: "not desired" })
          : pending
            ? el("span", { class: "badge warn", text: "pending" })
            : el("span", { class: "badge ok", text: "in sync" });
      return el(
        "tr",
        { "data-field": name },
        el("th", { scope: "row", text: name }),
        el("td", { class: "desired", text: fmt(wanted) }),
        el("td", { class: "reported", text: fmt(state.reported[name]) }),
        el("td", {}, status),
      );
    });
    $("#state-table tbody").replaceChildren(...rows);
    const pending = Object.keys(state.delta).length;
    $("#state-summary").textContent =
      `Desired v${state.versions.desired} (${fmtTime(state.timestamps.desired)}` +
      `${state.desired_source ? `, by ${state.desired_source}` : ""}) · ` +
      `reported v${state.versions.reported} (${fmtTime(state.timestamps.reported)}) · ` +
      (pending ? `${pending} field(s) pending` : "in sync");
    if (!dirty) for (const [name] of fields) writeControl(name, state.desired[name]);
    panel.dataset.panelState = "ready";
    panel.dataset.desiredVersion = String(state.versions.desired);
  };

  const refresh = async () => {
    const got = await call(`${base}/state`);
    if (got.ok) render(got.data, got.etag);
  };

  $("#state-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = $("#state-error");
    const result = $("#state-result");
    error.textContent = "";
    result.textContent = "";
    const patch = {};
    for (const [name, schema] of fields) {
      const value = readControl(name, schema);
      if (value === undefined && name in current.desired) patch[name] = null;
      else if (value !== undefined && value !== current.desired[name]) patch[name] = value;
    }
    if (Object.keys(patch).length === 0) {
      result.textContent = "Nothing to change.";
      return;
    }
    const sent = await call(`${base}/state/desired`, { method: "PATCH", body: patch, headers: { "If-Match": etag } });
    if (sent.ok) {
      dirty = false;
      render(sent.data, sent.etag);
      result.textContent = `Saved: desired version ${sent.data.versions.desired}; the device gets the delta when it is online.`;
      return;
    }
    if (sent.status === 412) {
      dirty = false;
      await refresh();
      error.textContent = `${sent.data.detail} The form now shows the current desired state: check it and save again.`;
      return;
    }
    for (const problem of sent.data.errors || []) {
      document.getElementById(`state-field-${problem.field}`)?.setAttribute("aria-invalid", "true");
    }
    error.textContent = sent.data.detail || `HTTP ${sent.status}`;
  });

  $("#state-reset").addEventListener("click", () => {
    dirty = false;
    if (current) render(current, etag);
  });

  await refresh();
  setInterval(() => {
    if (document.visibilityState === "visible") refresh().catch(() => {});
  }, POLL_MS);
}

init().catch((error) => {
  const summary = $("#state-summary");
  if (summary) summary.textContent = `Cannot load the state: ${error.message}`;
});
