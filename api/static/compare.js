// Compare: one metric of two or more jobs overlaid, against step or wall time (e.g. flash vs dmd2).
import { api, h } from "./api.js";
import { joined, makeChart } from "./chart.js";
import { ema, prefs } from "./groups.js";

async function allPoints(id, key) {
  const points = [];
  let since = -1;
  for (;;) { // page through with since_step = the last step returned
    const page = await api(`/jobs/${id}/metrics?key=${encodeURIComponent(key)}&since_step=${since}&limit=20000`);
    points.push(...page.points);
    if (!page.has_more || !page.points.length) return points;
    since = page.points.at(-1).step;
  }
}

export function comparePage(root) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const picked = new Set((params.get("jobs") || "").split(",").filter(Boolean));
  const list = h("div", { id: "compare-jobs" });
  const key = h("select", { name: "key" });
  const axis = h("select", { name: "x" }, h("option", { value: "step" }, "step"),
    h("option", { value: "time" }, "wall time (s since the first point)"));
  const settings = prefs.load(); // the job page's smoothing weight, shared
  const smoothing = h("input", { type: "range", id: "compare-smoothing", min: 0, max: 0.99, step: 0.01,
                                 value: settings.smoothing, "aria-label": "smoothing" });
  const error = h("div", { className: "error" });
  const plotBox = h("div", { id: "compare-chart" });
  let chart = null;
  const names = new Map(); // id -> what the legend shows: the job's name, with its id only where names repeat
  root.replaceChildren(h("h1", {}, "Compare"),
    h("section", { className: "card" }, h("label", {}, "Jobs"), list,
      h("div", { className: "row" }, h("div", {}, h("label", {}, "Metric"), key),
        h("div", {}, h("label", {}, "X axis"), axis),
        h("div", {}, h("label", { htmlFor: "compare-smoothing" }, "Smoothing (moving average)"), smoothing)), error),
    h("section", { className: "card" }, plotBox));

  const checked = () => [...list.querySelectorAll("input:checked")].map((i) => i.value);

  async function loadKeys() {
    const keys = new Set();
    for (const id of checked()) (await api(`/jobs/${id}/metrics?limit=1`)).keys.forEach((k) => keys.add(k));
    const current = key.value || params.get("key");
    key.replaceChildren(...[...keys].sort().map((k) => h("option", { value: k, selected: k === current }, k)));
  }

  async function draw() {
    error.textContent = "";
    const ids = checked();
    if (chart) { chart.destroy(); chart = null; }
    plotBox.replaceChildren();
    if (ids.length < 1 || !key.value) return;
    const tables = [];
    for (const id of ids) {
      const points = await allPoints(id, key.value);
      const t0 = points.length ? points[0].wall_time : 0;
      const xs = points.map((p) => (axis.value === "step" ? p.step : p.wall_time - t0));
      tables.push([xs, ema(points.map((p) => p.value), Number(smoothing.value))]);
    }
    chart = makeChart(plotBox, { title: key.value, labels: ids.map((id) => names.get(id) || id), legend: true,
                                 xLabel: axis.value === "step" ? "step" : "seconds" });
    chart.setData(joined(tables));
    history.replaceState(null, "", `#/compare?jobs=${ids.join(",")}&key=${encodeURIComponent(key.value)}`);
  }

  const update = () => loadKeys().then(draw).catch((err) => { error.textContent = err.message; });
  api("/jobs?limit=100").then((page) => {
    const count = new Map();
    for (const job of page.data) if (job.name) count.set(job.name, (count.get(job.name) || 0) + 1);
    for (const job of page.data) {
      const repeated = job.name && count.get(job.name) > 1;
      names.set(job.id, job.name ? (repeated ? `${job.name} (${job.id.slice(-6)})` : job.name) : job.id);
    }
    list.replaceChildren(...page.data.map((job) => h("label", { className: "pick" },
      h("input", { type: "checkbox", value: job.id, checked: picked.has(job.id), onchange: update }), " ",
      job.name || job.id, " ", h("span", { className: "muted" }, `${job.id} · ${job.status}`))));
    if (!page.data.length) list.append(h("p", { className: "muted" }, "No jobs yet."));
    update();
  }).catch((err) => { error.textContent = err.message; });
  key.addEventListener("change", () => draw().catch((err) => { error.textContent = err.message; }));
  axis.addEventListener("change", () => draw().catch((err) => { error.textContent = err.message; }));
  smoothing.addEventListener("change", () => {
    prefs.save({ ...prefs.load(), smoothing: Number(smoothing.value) });
    draw().catch((err) => { error.textContent = err.message; });
  });
  return () => { if (chart) chart.destroy(); };
}
