// The dashboard's router and its small pages (login, jobs, new job); the job and compare pages have modules.
import { ApiError, api, duration, h, rate, token } from "./api.js";
import { comparePage } from "./compare.js";
import { jobPage } from "./job.js";

const root = document.getElementById("root");
const STATUSES = ["queued", "starting", "running", "cancelling", "cancelled", "succeeded", "failed", "recovering"];
let cleanup = () => {};

function loginPage() {
  const input = h("input", { name: "token", type: "password", autocomplete: "current-password", required: true,
                             placeholder: "fdmd_…", size: 40 });
  const error = h("div", { className: "error" });
  const form = h("form", { className: "card", id: "login-form" },
    h("label", { htmlFor: "token" }, "API token (from `flashdmd up` or `flashdmd token create`)"),
    input, h("div", {}, h("button", { type: "submit" }, "Log in")), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    token.set(input.value.trim());
    try {
      await api("/jobs?limit=1");  // checks the token before anything else uses it
      location.hash = "#/jobs";
    } catch (err) {
      token.clear();
      error.textContent = err.status === 401 ? "That token was not accepted." : err.message;
    }
  });
  root.replaceChildren(h("section", { className: "login" }, h("h1", {}, "Log in"), form));
  input.focus();
}

function jobRow(job) {
  const { step, total_steps: total, eta } = job.progress;
  return h("tr", { dataset: { job: job.id, status: job.status } },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name || job.id),
      job.name ? h("div", { className: "muted" }, job.id) : null),
    h("td", {}, h("span", { className: `status ${job.status}` }, job.status)),
    h("td", {}, h("progress", { max: total || 1, value: step }), " ",
      h("span", { className: "steps" }, `${step}/${total}`)),
    h("td", {}, rate(job.progress.rate)),
    h("td", {}, job.status === "succeeded" ? "done" : duration(eta)),
    h("td", { className: "muted" }, new Date(job.created_at).toLocaleString()));
}

function jobsPage() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filter = h("select", { name: "status" }, h("option", { value: "" }, "all"),
    STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const body = h("tbody", { id: "jobs-body" });
  const error = h("div", { className: "error" });
  const more = h("div", { className: "muted" });
  root.replaceChildren(h("h1", {}, "Jobs"),
    h("section", { className: "card" },
      h("div", { className: "row" }, h("div", {}, h("label", {}, "Status"), filter),
        h("div", {}, h("a", { href: "#/new" }, "New job →"))),
      h("div", { className: "scroll" }, h("table", { id: "jobs" },
        h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Steps/s", "ETA", "Created"].map((t) => h("th", {}, t)))),
        body)), more, error));
  let stopped = false;
  let timer;
  // Polling the list is one indexed query per tick, and the list has no per-job stream to multiplex.
  async function refresh() {
    try {
      const query = new URLSearchParams({ limit: "100" });
      if (filter.value) query.set("status", filter.value);
      const page = await api(`/jobs?${query}`);
      if (stopped) return;
      body.replaceChildren(...page.data.map(jobRow));
      if (!page.data.length) body.append(h("tr", {}, h("td", { colSpan: 6, className: "muted" }, "No jobs yet.")));
      more.textContent = page.has_more ? "Showing the newest 100." : "";
      error.textContent = "";
    } catch (err) {
      error.textContent = err.message;
    }
    if (!stopped) timer = setTimeout(refresh, 1500);
  }
  filter.addEventListener("change", () => { clearTimeout(timer); refresh(); });
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}

// Quick fields over the spec's most edited settings; the JSON below holds the rest. Their data-field is the
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

function newJobPage() {
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
    h("section", { className: "card" }, field("spec", "Spec (JSON; the fields above override it)", spec)),
    h("div", {}, submit), error);
  root.replaceChildren(h("h1", {}, "New job"), form);

  let presets = {};
  const fill = () => {
    const chosen = presets[preset.value];
    if (!chosen) return;
    spec.value = JSON.stringify(chosen, null, 2);
    for (const [path, input] of quick) input.value = getPath(chosen, path) ?? "";
  };
  preset.addEventListener("change", fill);
  api("/ui/presets.json").then((found) => {
    presets = found;
    preset.replaceChildren(...Object.keys(found).map((n) => h("option", { value: n }, n)));
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
      body = JSON.parse(spec.value);
    } catch (err) {
      form.querySelector('.field[data-field="spec"] .field-error').textContent = `not valid JSON: ${err.message}`;
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

const ROUTES = [
  [/^#\/login$/, loginPage],
  [/^#\/jobs\/([^/?]+)$/, (m) => jobPage(root, decodeURIComponent(m[1]))],
  [/^#\/jobs(\?.*)?$/, jobsPage],
  [/^#\/new$/, newJobPage],
  [/^#\/compare(\?.*)?$/, () => comparePage(root)],
];

function route() {
  cleanup();
  cleanup = () => {};
  const hash = location.hash || "#/jobs";
  document.getElementById("nav").hidden = !token.get();
  if (!token.get() && hash !== "#/login") {
    location.hash = "#/login";
    return;
  }
  for (const [pattern, page] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      cleanup = page(match) || (() => {});
      return;
    }
  }
  location.hash = "#/jobs";
}

document.getElementById("logout").addEventListener("click", () => { token.clear(); location.hash = "#/login"; });
window.addEventListener("hashchange", route);
route();
