// The dashboard's router and its small pages (login, jobs); the new-job, job and compare pages have modules.
import { api, h, rate, token } from "./api.js";
import { comparePage } from "./compare.js";
import { etaText, jobPage } from "./job.js";
import { newJobPage } from "./newjob.js";

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
  const { step, total_steps: total } = job.progress;
  return h("tr", { dataset: { job: job.id, status: job.status } },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name || job.id),
      job.name ? h("div", { className: "muted" }, job.id) : null),
    h("td", {}, h("span", { className: `status ${job.status}` }, job.status)),
    h("td", {}, h("progress", { max: total || 1, value: step }), " ",
      h("span", { className: "steps" }, `${step}/${total}`)),
    h("td", {}, rate(job.progress.rate)),
    h("td", {}, etaText(job)),
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

const ROUTES = [
  [/^#\/login$/, loginPage],
  [/^#\/jobs\/([^/?]+)$/, (m) => jobPage(root, decodeURIComponent(m[1]))],
  [/^#\/jobs(\?.*)?$/, jobsPage],
  [/^#\/new(\?.*)?$/, () => newJobPage(root)],
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
