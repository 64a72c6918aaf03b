// The new-job page: a preset or a cloned job fills the spec editor (JSON or YAML) and a few quick fields.
import { ApiError, api, h } from "./api.js";

// Quick fields over the spec's most edited settings; the spec below holds the rest. Their data-field is the
// name the server uses in a 422's `fields`, so errors land next to the input that caused them.
const QUICK = [
  ["spec.model.teacher", "Teacher", "text"],
  ["spec.train.max_steps", "Max steps", "number"],
  ["spec.train.batch_size", "Batch size", "number"],
  ["spec.train.checkpoint_every", "Checkpoint every", "number"],
  ["spec.train.sample_every", "Sample every", "number"],
];

function getPath(obj, path) {
  return path.split(".").slice(1).reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
}

function setPath(obj, path, value) {
  const keys = path.split(".").slice(1);
  let node = obj;
  for (const k of keys.slice(0, -1)) node = node[k] = node[k] && typeof node[k] === "object" ? node[k] : {};
  node[keys.at(-1)] = value;
}

function field(name, label, input) {
  return h("div", { className: "field", dataset: { field: name } }, h("label", {}, label), input,
    h("div", { className: "field-error" }));
}

// The spec box takes JSON or YAML. YAML is translated by the server (POST /specs/parse), which reads it the way
// `flashdmd train` does; the page ships no YAML parser. Either way POST /jobs then validates the JSON.
async function parseSpec(text) {
  try {
    return JSON.parse(text);
  } catch (jsonError) {
    try {
      return (await api("/specs/parse", { method: "POST", text, type: "application/yaml" })).spec;
    } catch (yamlError) {
      // Text that starts like JSON was most likely meant as JSON: its own error says more.
      if (/^\s*[{[]/.test(text)) throw new Error(`not valid JSON: ${jsonError.message}`);
      throw yamlError;
    }
  }
}

export function newJobPage(root) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const from = params.get("from"); // "Clone" on a job page: its spec, to edit and resubmit
  const preset = h("select", { name: "preset" });
  const name = h("input", { name: "name", placeholder: "optional" });
  const spec = h("textarea", { name: "spec", rows: 18, spellcheck: false });
  const quick = QUICK.map(([path, label, type]) => [path, h("input", { name: path, type, step: "any" })]);
  const error = h("div", { className: "error", id: "form-error" });
  const submit = h("button", { type: "submit" }, "Submit");
  const form = h("form", { id: "new-job" },
    h("section", { className: "card" },
      h("div", { className: "row" }, field("preset", "Preset", preset), field("name", "Name", name)),
      h("div", { className: "row" }, quick.map(([path, input], i) => field(path, QUICK[i][1], input)))),
    h("section", { className: "card" }, field("spec", "Spec (JSON or YAML; the fields above override it)", spec)),
    h("div", {}, submit), error);
  const title = h("h1", {}, "New job");
  root.replaceChildren(title, form);

  let presets = {};
  const fill = () => {
    const chosen = presets[preset.value];
    if (!chosen) return;
    spec.value = JSON.stringify(chosen, null, 2);
    for (const [path, input] of quick) input.value = getPath(chosen, path) ?? "";
  };
  preset.addEventListener("change", fill);
  const clone = from ? api(`/jobs/${encodeURIComponent(from)}`).catch((err) => {
    error.textContent = `clone: ${err.message}`; // the presets still load
    return null;
  }) : Promise.resolve(null);
  Promise.all([api("/ui/presets.json"), clone]).then(([found, source]) => {
    presets = found;
    let first = Object.keys(found)[0];
    if (source) {
      // The stored spec is the one the job ran (paths resolved); it goes first and is chosen.
      first = `clone of ${source.name || source.id}`;
      presets = { [first]: source.spec, ...found };
      name.value = source.name ? `${source.name}-2` : "";
      title.textContent = `New job: clone of ${source.name || source.id}`;
    }
    // "Group / name" keys: one <optgroup> per group, in the server's order (presets/README.md's).
    const groups = new Map();
    for (const n of Object.keys(presets)) {
      const [group, label] = n.includes(" / ") ? n.split(" / ", 2) : ["", n];
      if (!groups.has(group)) groups.set(group, []);
      groups.get(group).push(h("option", { value: n, selected: n === first }, label));
    }
    preset.replaceChildren(...[...groups].map(([group, options]) =>
      group ? h("optgroup", { label: group }, options) : options).flat());
    fill();
  }).catch((err) => { error.textContent = `presets: ${err.message}`; });

  function showErrors(err) {
    const lines = err.message.split("; ");
    for (const [i, path] of err.fields.entries()) {
      // The longest quick field that names this path or one of its parents; else the spec box.
      const target = [...form.querySelectorAll(".field")]
        .filter((el) => path === el.dataset.field || path.startsWith(`${el.dataset.field}.`))
        .sort((a, b) => b.dataset.field.length - a.dataset.field.length)[0]
        || form.querySelector(`.field[data-field="${path.startsWith("spec") ? "spec" : "name"}"]`);
      if (!target) continue;
      const box = target.querySelector(".field-error");
      box.textContent = [box.textContent, lines[i] || err.message].filter(Boolean).join("\n");
      target.querySelector("input, select, textarea").classList.add("invalid");
    }
    if (!err.fields.length) error.textContent = err.message;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    form.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
    form.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
    error.textContent = "";
    let body;
    try {
      body = await parseSpec(spec.value);
    } catch (err) {
      if (err instanceof ApiError && err.fields.length) showErrors(err);
      else form.querySelector('.field[data-field="spec"] .field-error').textContent = err.message;
      return;
    }
    for (const [path, input] of quick) {
      if (input.value === "") continue;
      // Numbers go as numbers; the server still validates them (and names the field if they are wrong).
      setPath(body, path, input.type === "number" && input.value.trim() !== "" ? Number(input.value) : input.value);
    }
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", body: { spec: body, name: name.value || null } });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (err instanceof ApiError && err.fields.length) showErrors(err);
      else error.textContent = err.message;
    } finally {
      submit.disabled = false;
    }
  });
}
