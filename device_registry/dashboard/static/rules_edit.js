// The rules page's edit and delete: edit opens the rule's definition as JSON (what POST and
// PUT /api/v1/rules take), saving PUTs it (the registry validates it against the catalogue;
// its problem+json 422 errors are listed under the editor, marked aria-invalid); delete asks
// for confirmation. Both are admin actions (the buttons carry data-needs-role="admin").

// What the API adds to a rule as served; the rest is the definition a PUT takes back.
const SERVER_FIELDS = ["id", "version", "created_at", "updated_at", "invalid", "created_by"];

export function ruleEditor(kit, { onChanged }) {
  const { api, $, el, flash, explain, problemText } = kit;
  const section = $("#rule-edit");
  const form = $("#rule-edit-form");
  const textarea = $("#rule-edit-json");
  const errors = $("#rule-edit-errors");
  const note = $("#rule-edit-note");
  let editing = null;

  const close = () => {
    editing = null;
    section.hidden = true;
    errors.replaceChildren();
    textarea.removeAttribute("aria-invalid");
    delete section.dataset.ruleId;
  };

  const edit = (rule) => {
    editing = rule;
    const definition = Object.fromEntries(Object.entries(rule).filter(([k]) => !SERVER_FIELDS.includes(k)));
    textarea.value = JSON.stringify(definition, null, 2);
    errors.replaceChildren();
    textarea.removeAttribute("aria-invalid");
    note.textContent = rule.invalid
      ? `Stored definition unreadable (${rule.invalid}): write a new one.`
      : `${rule.name}, version ${rule.version}.`;
    $("#edit-h").textContent = `Edit rule ${rule.name}`;
    section.dataset.ruleId = rule.id;
    section.hidden = false;
    section.scrollIntoView();
    textarea.focus();
  };

  const remove = async (rule, button) => {
    if (!window.confirm(`Delete rule ${rule.name}? Its open alerts are cleared; this cannot be undone.`)) return;
    button.disabled = true;
    try {
      await api(`/api/v1/rules/${encodeURIComponent(rule.id)}`, { method: "DELETE" });
      flash(`Rule ${rule.name} deleted.`, "info");
      if (editing && editing.id === rule.id) close();
    } catch (failure) {
      flash(`Cannot delete ${rule.name}: ${explain(failure)}`);
      button.disabled = button.dataset.roleLocked === "true";
    }
    await onChanged();
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!editing) return;
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
    const button = $("#rule-save");
    button.disabled = true;
    try {
      const saved = await api(`/api/v1/rules/${encodeURIComponent(editing.id)}`, { method: "PUT", body });
      flash(`Rule ${saved.name} saved (version ${saved.version}).`, "info");
      close();
      await onChanged();
    } catch (failure) {
      textarea.setAttribute("aria-invalid", "true");
      errors.replaceChildren(problemText(failure));
    } finally {
      button.disabled = button.dataset.roleLocked === "true";
    }
  });
  $("#rule-edit-cancel").addEventListener("click", close);
  return { edit, remove };
}
