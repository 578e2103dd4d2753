// The API keys page: list, create (the secret shown once, on this page only), revoke.
//
// Everything here is admin-only in the API (GET/POST/DELETE /api/v1/api-keys); a lower key
// sees why instead of a list, and its controls are disabled by the role check of app.js.
// The key used by this tab is marked: revoking it signs this tab out at its next request.

export async function initApiKeys(kit) {
  const { api, ApiError, $, el, badge, flash, fmtTime, ago, explain, problemText, poll, ready } = kit;
  const tbody = $("#keys-table tbody");
  const note = $("#keys-note");
  const form = $("#key-form");
  const error = $("#key-error");
  const result = $("#key-result");
  let me = null;
  try {
    me = await api("/api/v1/api-keys/me");
  } catch {
    // the list below says what is wrong
  }

  const revoke = async (key, button) => {
    const self = me && key.id === me.id;
    const question = self
      ? `Revoke ${key.name}? It is the key this tab is signed in with: you will be signed out.`
      : `Revoke ${key.name} (${key.role})? Whoever uses it is refused at once.`;
    if (!window.confirm(question)) return;
    button.disabled = true;
    try {
      await api(`/api/v1/api-keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      flash(`Key ${key.name} revoked.`, "info");
      result.replaceChildren();
    } catch (failure) {
      flash(`Cannot revoke ${key.name}: ${explain(failure)}`);
    }
    await poller.now();
  };

  const load = async () => {
    let page;
    try {
      page = await api("/api/v1/api-keys");
    } catch (failure) {
      if (!(failure instanceof ApiError && failure.status === 403)) throw failure;
      note.textContent = `Only an admin key may list and manage keys; this tab is signed in with ${me ? `${me.name}, a ${me.role} key` : "a lower key"}.`;
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "Not shown to this key's role." })));
      ready();
      return;
    }
    note.textContent = `${page.items.length} key(s).`;
    tbody.replaceChildren(
      ...page.items.map((k) => {
        const button = el("button", {
          type: "button",
          class: "small danger",
          "aria-label": `Revoke key ${k.name}`,
          text: "Revoke",
          dataset: { needsRole: "admin" },
        });
        button.addEventListener("click", () => revoke(k, button));
        return el(
          "tr",
          { dataset: { keyId: k.id, role: k.role } },
          el("th", { scope: "row" }, k.name, me && k.id === me.id ? " " : "", me && k.id === me.id ? badge("this tab", "neutral") : ""),
          el("td", { text: k.role }),
          el("td", {}, el("code", { text: `${k.prefix}…` })),
          el("td", { text: fmtTime(k.created_at), title: ago(k.created_at) }),
          el("td", {}, button),
        );
      }),
    );
    ready();
  };
  const poller = poll(load, 15000);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.replaceChildren();
    result.replaceChildren();
    const name = form.elements.name.value.trim();
    form.elements.name.removeAttribute("aria-invalid");
    if (!name) {
      form.elements.name.setAttribute("aria-invalid", "true");
      error.textContent = "Give the key a name (who or what will use it).";
      return;
    }
    const button = $("#key-create");
    button.disabled = true;
    try {
      const created = await api("/api/v1/api-keys", { method: "POST", body: { name, role: form.elements.role.value } });
      // Shown once: the registry keeps only a hash. Selectable text, never stored, never in a URL.
      result.replaceChildren(
        el(
          "div",
          { class: "credentials", "aria-label": `New key ${created.name}` },
          el("p", { text: `Key ${created.name} (${created.role}) created — copy it now, it is not shown again:` }),
          el("code", { class: "secret", id: "new-key-secret", text: created.key }),
        ),
      );
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
