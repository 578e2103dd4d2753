// The notifications page: channels (create with the webhook secret shown once, test, delete) and
// each channel's delivery log (state, attempts, the receiver's last status code or error).
//
// Listing needs a viewer key, a test an operator key, creating and deleting an admin key; lower
// keys get the controls disabled by the role check of app.js, and the API decides anyway.

const SEVERITIES = ["critical", "major", "minor", "warning", "info"];
const STATE_BADGE = { delivered: "ok", pending: "warn", failed: "bad" };

export async function initChannels(kit) {
  const { api, $, el, badge, flash, fmtTime, ago, explain, problemText, poll, ready, parseTags } = kit;
  const tbody = $("#channels-table tbody");
  const note = $("#channels-note");
  const form = $("#channel-form");
  const error = $("#channel-error");
  const result = $("#channel-result");
  const logBox = $("#deliveries");
  let shown = null; // the channel whose delivery log is open

  const where = (c) => (c.kind === "webhook" ? c.url : c.recipients.join(", "));
  const routeText = (route) => {
    if (!route) return "— (only rules naming it)";
    const parts = [route.severities.length ? route.severities.join(", ") : "any severity"];
    if (route.device_types.length) parts.push(`types ${route.device_types.join(", ")}`);
    const tags = Object.entries(route.tags).map(([k, v]) => `${k}=${v}`);
    if (tags.length) parts.push(`tagged ${tags.join(", ")}`);
    return parts.join(" · ");
  };

  const loadLog = async () => {
    if (!shown) return;
    const page = await api(`/api/v1/channels/${encodeURIComponent(shown)}/deliveries?limit=50`);
    $("#deliveries-channel").textContent = shown;
    logBox.hidden = false;
    const rows = page.items.map((d) => {
      const last = d.log[0];
      const answer = last ? (last.status_code != null ? `${last.status_code}` : last.error || "—") : "not tried yet";
      return el(
        "tr",
        { dataset: { deliveryId: d.id, status: d.status } },
        el("td", { text: fmtTime(d.created_at), title: ago(d.created_at) }),
        el("td", { text: d.transition }),
        el("td", {}, el("code", { text: d.alert_id })),
        el("td", {}, badge(d.status, STATE_BADGE[d.status] || "neutral")),
        el("td", {
          text: String(d.attempts),
          title: d.log.map((a) => `${fmtTime(a.at)}: ${a.status_code ?? a.error} (${a.duration_ms} ms)`).join("\n"),
        }),
        el("td", { class: "last-answer", text: d.status === "pending" && d.next_attempt_at ? `${answer} · next ${ago(d.next_attempt_at)}` : answer }),
      );
    });
    $("#deliveries-table tbody").replaceChildren(
      ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No deliveries yet." }))]),
    );
  };

  const act = async (label, task) => {
    try {
      await task();
    } catch (failure) {
      flash(`${label}: ${explain(failure)}`);
    }
    await poller.now();
  };

  const load = async () => {
    const page = await api("/api/v1/channels");
    note.textContent = `${page.items.length} channel(s).`;
    tbody.replaceChildren(
      ...page.items.map((c) => {
        const log = el("button", { type: "button", class: "small", text: "Log", "aria-label": `Delivery log of ${c.name}` });
        log.addEventListener("click", () => {
          shown = c.name;
          act(`Cannot load the log of ${c.name}`, loadLog);
        });
        const test = el("button", {
          type: "button",
          class: "small",
          text: "Send test",
          "aria-label": `Send a test notification through ${c.name}`,
          dataset: { needsRole: "operator" },
        });
        test.addEventListener("click", () =>
          act(`Cannot test ${c.name}`, async () => {
            await api(`/api/v1/channels/${encodeURIComponent(c.name)}/test`, { method: "POST", body: {} });
            shown = c.name;
            flash(`Test notification queued for ${c.name}.`, "info");
          }),
        );
        const remove = el("button", {
          type: "button",
          class: "small danger",
          text: "Delete",
          "aria-label": `Delete channel ${c.name}`,
          dataset: { needsRole: "admin" },
        });
        remove.addEventListener("click", () => {
          if (!window.confirm(`Delete ${c.name} with its delivery log? Rules naming it stop notifying it.`)) return;
          act(`Cannot delete ${c.name}`, async () => {
            await api(`/api/v1/channels/${encodeURIComponent(c.name)}`, { method: "DELETE" });
            if (shown === c.name) {
              shown = null;
              logBox.hidden = true;
            }
            flash(`Channel ${c.name} deleted.`, "info");
          });
        });
        return el(
          "tr",
          { dataset: { channel: c.name, kind: c.kind } },
          el("th", { scope: "row" }, c.name, c.enabled ? "" : " ", c.enabled ? "" : badge("disabled", "neutral")),
          el("td", { text: c.kind }),
          el("td", { class: "wrap", text: where(c) }),
          el("td", { text: routeText(c.route) }),
          el("td", { class: "actions" }, log, " ", test, " ", remove),
        );
      }),
    );
    await loadLog();
    ready();
  };
  const poller = poll(load, 5000);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.replaceChildren();
    result.replaceChildren();
    const kind = form.elements.kind.value;
    const target = form.elements.target.value.trim();
    const body = { name: form.elements.name.value.trim(), kind };
    if (kind === "webhook") body.url = target;
    else body.recipients = target.split(",").map((r) => r.trim()).filter(Boolean);
    try {
      const severities = form.elements.severities.value.split(",").map((s) => s.trim()).filter(Boolean);
      const tags = parseTags(form.elements.tags.value);
      const unknown = severities.filter((s) => !SEVERITIES.includes(s));
      if (unknown.length) throw new Error(`unknown severity ${unknown.join(", ")} (one of ${SEVERITIES.join(", ")})`);
      if (severities.length || Object.keys(tags).length) body.route = { severities, tags };
    } catch (failure) {
      error.textContent = failure.message;
      return;
    }
    const button = $("#channel-create");
    button.disabled = true;
    try {
      const created = await api("/api/v1/channels", { method: "POST", body });
      const parts = [el("p", { text: `Channel ${created.name} created.` })];
      if (created.secret) {
        // Shown once: webhooks are signed with it; the API never returns it again.
        parts.push(
          el("p", { text: `Its signing secret (header ${created.signature_header}) — copy it now, it is not shown again:` }),
          el("code", { class: "secret", id: "new-channel-secret", text: created.secret }),
        );
      }
      result.replaceChildren(el("div", { class: "credentials", "aria-label": `New channel ${created.name}` }, ...parts));
      form.reset();
      await poller.now();
    } catch (failure) {
      error.replaceChildren(problemText(failure));
    } finally {
      button.disabled = button.dataset.roleLocked === "true";
    }
  });
  await poller.now();
}
