// iotfleet dashboard: the jobs page (list with progress, failures, cancel; a new-job form per device type:
// a command, or a desired-state change for a type with a state model).
//
// Loaded by app.js for the jobs page (PAGES.jobs): `initJobs(kit)` gets app.js's one copy of the
// API client and helpers (see `kit` in app.js).

let api, $, el, fmtInt, fmtTime, badge, flash, ready, poll, query, argInput, parseTags, problemText;

const POLL_MS = 2000;
const ENDED = new Set(["completed", "canceled", "aborted"]);
const STATE_BADGE = { scheduled: "neutral", in_progress: "warn", completed: "ok", canceled: "neutral", aborted: "bad" };

function progressBar(job) {
  const c = job.counts;
  const total = Math.max(job.total, 1);
  const part = (n, cls) => el("span", { class: cls, style: `width: ${(100 * n) / total}%` });
  const inFlight = Math.max(0, job.released - c.succeeded - c.failed - c.expired);
  const label = `${fmtInt(c.succeeded)} succeeded, ${fmtInt(c.failed + c.expired)} failed, ${fmtInt(inFlight)} in flight, ${fmtInt(job.total - job.released)} not released of ${fmtInt(job.total)}`;
  return el(
    "div",
    {},
    el("div", { class: "jobbar", role: "img", "aria-label": label }, part(c.succeeded, "ok"), part(c.failed + c.expired, "bad"), part(inFlight, "flight")),
    el("small", { class: "muted", text: `${fmtInt(c.succeeded + c.failed + c.expired)} / ${fmtInt(job.total)} finished` }),
  );
}

function targetText(target) {
  const parts = [];
  if (target.device_type) parts.push(`type ${target.device_type}`);
  if (target.tags) parts.push(Object.entries(target.tags).map(([k, v]) => `${k}=${v}`).join(", "));
  if (target.device_ids) parts.push(`${target.device_ids.length} device id(s)`);
  if (target.q) parts.push(`“${target.q}”`);
  return parts.join(" · ");
}

async function showFailures(job) {
  const section = $("#job-failures");
  section.hidden = false;
  section.dataset.jobId = job.id;
  $("#failures-job").textContent = job.name || job.id;
  const rows = [];
  for (const status of ["failed", "expired"]) {
    const page = await api(`/api/v1/jobs/${encodeURIComponent(job.id)}/executions${query({ status, limit: 200 })}`);
    rows.push(...page.items);
  }
  $("#failures-table tbody").replaceChildren(
    ...(rows.length
      ? rows.map((e) =>
          el(
            "tr",
            { dataset: { deviceId: e.device_id } },
            el("td", {}, el("a", { href: `/devices/${encodeURIComponent(e.device_id)}`, text: e.device_id })),
            el("td", {}, badge(e.status, "bad")),
            el("td", { class: "mono", text: e.command_id || "–" }),
            el("td", { text: e.detail || "" }),
          ),
        )
      : [el("tr", {}, el("td", { colspan: 4, class: "muted", text: "No failure." }))]),
  );
}

// The JSON schema of a state field: its non-null alternative (state models make every field optional).
function stateField(prop) {
  const choices = prop.anyOf ? prop.anyOf.filter((p) => p.type !== "null") : [prop];
  return { ...choices[0], description: prop.description };
}

function stateInput(name, prop) {
  const schema = stateField(prop);
  const id = `job-state-${name}`;
  let input;
  if (schema.enum || schema.type === "boolean") {
    input = el("select", { id, name }, el("option", { value: "", text: "(unchanged)" }));
    for (const v of schema.enum || [true, false]) input.append(el("option", { value: JSON.stringify(v), text: String(v) }));
  } else {
    input = el("input", { id, name, type: "number", min: schema.minimum, max: schema.maximum, step: schema.type === "integer" ? "1" : "any", placeholder: "(unchanged)" });
  }
  if (schema.description) input.setAttribute("title", schema.description);
  return el("div", {}, el("label", { for: id, text: `Desired ${name}` }), input);
}

function readStateFields(box, schema) {
  const set = {};
  for (const input of box.querySelectorAll("input, select")) {
    if (input.value === "") continue;
    if (input.tagName === "SELECT") set[input.name] = JSON.parse(input.value);
    else set[input.name] = stateField(schema.properties[input.name]).type === "integer" ? parseInt(input.value, 10) : Number(input.value);
  }
  return set;
}

function actionText(action) {
  if (action.command) return `${action.command.name} ${JSON.stringify(action.command.args)}`;
  if (action.desired_state) return `desired state ${JSON.stringify(action.desired_state.set)}`;
  return Object.keys(action)[0];
}

function jobRow(job, refresh) {
  const cancel = el("button", {
    type: "button",
    class: "danger",
    "data-needs-role": "operator",
    text: "Cancel",
    onclick: async () => {
      cancel.disabled = true;
      try {
        await api(`/api/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
        flash(`Job ${job.name || job.id} canceled.`, "info");
      } catch (failure) {
        flash(problemText(failure).textContent);
      }
      refresh();
    },
  });
  const failures = el("button", { type: "button", class: "secondary", text: "Failures", onclick: () => showFailures(job) });
  return el(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    el("td", { text: fmtTime(job.created_at) }),
    el("td", { text: job.name || "–" }),
    el("td", { class: "mono", text: actionText(job.action) }),
    el("td", { text: targetText(job.target) }),
    el("td", {}, badge(job.status.replace("_", " "), STATE_BADGE[job.status] || "neutral"), job.detail ? el("div", { class: "muted", text: job.detail }) : null),
    el("td", {}, progressBar(job)),
    el("td", { class: "num", text: job.current_rate === null ? "∞" : fmtInt(Math.round(job.current_rate)) }),
    el("td", { class: "actions" }, ENDED.has(job.status) ? null : cancel, failures),
  );
}

async function setupForm(onCreated) {
  const types = (await api("/api/v1/device-types")).items;
  const typeSelect = $("#job-type");
  typeSelect.replaceChildren(...types.map((t) => el("option", { value: t.name, text: t.name })));
  const wanted = new URLSearchParams(location.search).get("type");
  if (wanted && types.some((t) => t.name === wanted)) typeSelect.value = wanted;
  const nameSelect = $("#command-name");
  const argsBox = $("#command-args");
  const kindSelect = $("#job-kind");
  const stateBox = $("#state-fields");
  let schemas = {};
  let stateSchema = null;
  const stateOption = kindSelect.querySelector("option[value=desired_state]");
  // Only the chosen action's inputs are in the form (labels stay unique for assistive technology).
  const renderKind = () => {
    const desired = kindSelect.value === "desired_state" && stateSchema !== null;
    if (!desired) kindSelect.value = "command";
    $("#command-box").hidden = desired;
    stateBox.hidden = !desired;
    const props = desired ? Object.entries(stateSchema.properties || {}) : [];
    stateBox.replaceChildren(stateBox.querySelector("legend"), ...props.map(([n, p]) => stateInput(n, p)));
    if (desired) argsBox.replaceChildren(el("legend", { text: "Arguments" }));
    else renderArgs();
  };
  const renderArgs = () => {
    if (kindSelect.value === "desired_state") return;
    const schema = schemas[nameSelect.value] || {};
    const required = new Set(schema.required || []);
    const props = Object.entries(schema.properties || {});
    argsBox.replaceChildren(
      el("legend", { text: "Arguments" }),
      ...(props.length ? props.map(([n, p]) => argInput(n, p, required.has(n), schema)) : [el("p", { class: "muted", text: "No argument." })]),
    );
  };
  const loadType = async () => {
    const type = await api(`/api/v1/device-types/${encodeURIComponent(typeSelect.value)}`);
    schemas = type.command_schemas || {};
    stateSchema = type.state_schema || null;
    stateOption.disabled = stateSchema === null;
    stateOption.textContent = stateSchema === null ? "Set desired state (this type has none)" : "Set desired state";
    nameSelect.replaceChildren(...Object.keys(schemas).map((n) => el("option", { value: n, text: n })));
    renderKind();
  };
  typeSelect.addEventListener("change", loadType);
  nameSelect.addEventListener("change", renderArgs);
  kindSelect.addEventListener("change", renderKind);
  await loadType();
  const form = $("#job-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = $("#job-error");
    error.textContent = "";
    const args = {};
    for (const input of argsBox.querySelectorAll("input, select")) {
      if (input.value === "") continue;
      const kind = input.dataset.kind;
      args[input.name] = kind === "integer" || kind === "number" ? Number(input.value) : kind === "boolean" ? input.value === "true" : input.value;
    }
    const value = (id) => $(id).value.trim();
    let action = { command: { name: nameSelect.value, args } };
    if (kindSelect.value === "desired_state") {
      const set = readStateFields(stateBox, stateSchema);
      if (!Object.keys(set).length) {
        error.textContent = "Set at least one field of the desired state.";
        return;
      }
      action = { desired_state: { set } };
    }
    const body = { action, target: { device_type: typeSelect.value } };
    try {
      const tags = parseTags(value("#job-tags"));
      if (Object.keys(tags).length) body.target.tags = tags;
    } catch (problem) {
      error.textContent = problem.message;
      return;
    }
    const ids = value("#job-ids").split(",").map((s) => s.trim()).filter(Boolean);
    if (ids.length) body.target.device_ids = ids;
    if (value("#job-rate")) body.rollout = { max_per_minute: Number(value("#job-rate")) };
    if (value("#job-abort")) body.abort = { failure_pct: Number(value("#job-abort")), min_finished: Number(value("#job-abort-min") || 1) };
    if (value("#job-deadline")) body.deadline = new Date(Date.now() + Number(value("#job-deadline")) * 60000).toISOString();
    if (value("#job-name")) body.name = value("#job-name");
    const button = $("#job-create");
    button.disabled = true;
    try {
      const job = await api("/api/v1/jobs", { method: "POST", body });
      form.dataset.lastJobId = job.id;
      flash(`Job created for ${fmtInt(job.total)} device(s); it appears above with its progress.`, "info");
      onCreated();
    } catch (failure) {
      error.replaceChildren(problemText(failure));
    } finally {
      button.disabled = button.dataset.roleLocked === "true";
    }
  });
}

export async function initJobs(kit) {
  ({ api, $, el, fmtInt, fmtTime, badge, flash, ready, poll, query, argInput, parseTags, problemText } = kit);
  const tbody = $("#jobs-table tbody");
  let poller = null;
  const refresh = () => poller?.now();
  poller = poll(async () => {
    const page = await api(`/api/v1/jobs${query({ limit: 50 })}`);
    tbody.replaceChildren(
      ...(page.items.length ? page.items.map((job) => jobRow(job, refresh)) : [el("tr", {}, el("td", { colspan: 8, class: "muted", text: "No job yet." }))]),
    );
    const shown = $("#job-failures");
    if (!shown.hidden) {
      const job = page.items.find((j) => j.id === shown.dataset.jobId);
      if (job) await showFailures(job);
    }
    ready();
  }, POLL_MS);
  await setupForm(refresh);
  await poller.now();
}
