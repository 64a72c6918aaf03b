// The job page's curves: charts grouped by groups.js, smoothing, log scale, pin and hide, and markers.
import { h } from "./api.js";
import { metricChart } from "./chart.js";
import { GROUPS, OTHER, groupOf, prefs } from "./groups.js";

const PINNED = ["pinned", "Pinned"];

export function curvesPanel() {
  const settings = prefs.load();
  const entries = new Map(); // key -> {box, plotBox, chart, x, y, group}
  let markers = []; // [{step, color, kind}]

  const smoothing = h("input", { type: "range", id: "smoothing", min: 0, max: 0.99, step: 0.01,
                                 value: settings.smoothing, "aria-label": "smoothing" });
  const smoothingValue = h("span", { className: "muted", id: "smoothing-value" });
  const log = h("input", { type: "checkbox", id: "log-scale", checked: settings.log });
  const hiddenList = h("div", { className: "chips", id: "hidden-charts" });
  const empty = h("p", { className: "muted" }, "No metrics yet.");
  const sections = new Map();
  const section = ([id, title], folded = false) => {
    const grid = h("div", { className: "charts" });
    const count = h("span", { className: "muted count" });
    const el = folded
      ? h("details", { className: "group", dataset: { group: id }, id: `group-${id}` },
        h("summary", {}, title, " ", count), grid)
      : h("section", { className: "group", dataset: { group: id }, id: `group-${id}`, hidden: true },
        h("h3", {}, title, " ", count), grid);
    sections.set(id, { el, grid, count });
    return el;
  };
  const el = h("section", { className: "card", id: "curves" },
    h("div", { className: "row curves-head" },
      h("h2", {}, "Curves"),
      h("div", {}, h("label", { htmlFor: "smoothing" }, "Smoothing ", smoothingValue), smoothing),
      h("div", {}, h("label", { className: "inline" }, log, " log scale")),
      h("div", { className: "muted legend-keys" }, h("span", { className: "mark resume" }), "resumed ",
        h("span", { className: "mark guard" }), "collapse guard"),
      hiddenList),
    empty,
    section(PINNED), ...GROUPS.map((g) => section(g)), section(OTHER, true));

  const save = () => prefs.save(settings);
  const weight = () => Number(smoothing.value);
  smoothingValue.textContent = weight().toFixed(2);

  function redraw(entry) {
    const smoothed = entry.chart.draw(entry.x, entry.y, weight());
    // What is drawn, for tests and for the curious: the point count and the smoothed curve's last value.
    entry.box.dataset.points = entry.x.length;
    entry.box.dataset.last = smoothed.length ? String(smoothed.at(-1)) : "";
    entry.box.dataset.log = settings.log ? "1" : "0";
  }

  function build(entry) {
    if (entry.chart) entry.chart.destroy();
    entry.plotBox.replaceChildren();
    entry.chart = metricChart(entry.plotBox, { title: entry.key, log: settings.log, markers: () => markers });
    redraw(entry);
  }

  function toggle(list, key) {
    const at = settings[list].indexOf(key);
    if (at >= 0) settings[list].splice(at, 1);
    else settings[list].push(key);
    save();
  }

  function makeEntry(key) {
    const pin = h("button", { type: "button", className: "link pin", title: "pin to the top" }, "pin");
    const hide = h("button", { type: "button", className: "link hide", title: "hide this chart" }, "hide");
    const plotBox = h("div", { className: "plot" });
    const box = h("div", { className: "chart", dataset: { key } }, h("div", { className: "chart-tools" }, pin, hide),
      plotBox);
    const entry = { key, box, plotBox, pin, chart: null, x: [], y: [], group: null };
    pin.addEventListener("click", () => { toggle("pinned", key); place(entry); });
    hide.addEventListener("click", () => { toggle("hidden", key); place(entry); });
    return entry;
  }

  // Put a chart where it belongs now: hidden, pinned, or its group (which may change as values arrive).
  function place(entry) {
    const { key, box } = entry;
    const hidden = settings.hidden.includes(key);
    const group = settings.pinned.includes(key) ? PINNED[0] : groupOf(key, entry.y);
    entry.pin.textContent = settings.pinned.includes(key) ? "unpin" : "pin";
    box.dataset.group = group;
    box.hidden = hidden;
    if (entry.group !== group || !box.isConnected) {
      entry.group = group;
      const { grid } = sections.get(group);
      const after = [...grid.children].find((c) => c.dataset.key > key);
      grid.insertBefore(box, after || null);
    }
    refreshSections();
  }

  function refreshSections() {
    for (const [id, { el: sectionEl, grid, count }] of sections) {
      const shown = [...grid.children].filter((c) => !c.hidden).length;
      count.textContent = id === OTHER[0] || id === PINNED[0] ? `(${shown})` : "";
      if (id !== OTHER[0]) sectionEl.hidden = shown === 0;
      else sectionEl.hidden = grid.children.length === 0;
    }
    hiddenList.replaceChildren(...(settings.hidden.filter((k) => entries.has(k)).length
      ? [h("span", { className: "muted" }, "Hidden:"), ...settings.hidden.filter((k) => entries.has(k)).map((k) =>
        h("button", { type: "button", className: "chip", dataset: { key: k }, title: "show again",
                      onclick: () => { toggle("hidden", k); place(entries.get(k)); } }, `${k} ×`))]
      : []));
    empty.hidden = entries.size > 0;
  }

  smoothing.addEventListener("input", () => {
    settings.smoothing = weight();
    smoothingValue.textContent = weight().toFixed(2);
    save();
    entries.forEach(redraw);
  });
  log.addEventListener("change", () => {
    settings.log = log.checked;
    save();
    entries.forEach(build); // uPlot fixes a scale's distribution when the plot is made
  });

  return {
    el,
    // New points by key ({key: [{step, value}, ...]}): points at or before the last drawn step are repeats.
    add(byKey) {
      for (const [key, points] of Object.entries(byKey)) {
        let entry = entries.get(key);
        const created = !entry;
        if (created) {
          entry = makeEntry(key);
          entries.set(key, entry);
        }
        const last = entry.x.length ? entry.x.at(-1) : -1;
        for (const p of points) {
          if (p.step > last) { entry.x.push(p.step); entry.y.push(p.value); }
        }
        place(entry); // first: the chart measures its section's width
        if (created) build(entry);
        else redraw(entry);
      }
    },
    lastSteps: () => [...entries.values()].map((e) => (e.x.length ? e.x.at(-1) : -1)),
    setMarkers(list) {
      markers = list;
      el.dataset.markers = list.map((m) => `${m.kind}@${m.step}`).join(",");
      entries.forEach((e) => e.chart && e.chart.plot.redraw(false));
    },
    destroy: () => entries.forEach((e) => e.chart && e.chart.destroy()),
  };
}
