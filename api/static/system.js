// The system panel: what the worker reported with its last heartbeat (api/sysinfo.py), as JobPublic.system.
import { h } from "./api.js";

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

const meter = (percent) => h("meter", { min: 0, max: 100, value: percent ?? 0, low: 70, high: 90, optimum: 50 });

function row(label, ...value) {
  return h("div", { className: "sys-row" }, h("span", { className: "muted" }, label), h("span", {}, ...value));
}

function gpuRows(gpus) {
  return gpus.map((g) => row(`GPU ${g.index}${g.name ? ` · ${g.name}` : ""}`,
    g.memory_used_bytes === undefined ? "no NVML readings"
      : `${bytes(g.memory_used_bytes)}${g.memory_total_bytes ? ` of ${bytes(g.memory_total_bytes)}` : ""} · `,
    g.utilization_percent === undefined ? "" : meter(g.utilization_percent),
    g.utilization_percent === undefined ? "" : ` ${g.utilization_percent}%`));
}

export function systemPanel() {
  const body = h("div", { className: "sys", id: "system" }, h("p", { className: "muted" }, "No heartbeat yet."));
  const el = h("section", { className: "card", id: "system-panel" }, h("h2", {}, "System"), body);
  return {
    el,
    update(job) {
      const s = job.system;
      if (!s) return;
      const p = s.process || {};
      const gpus = s.gpus || [];
      const device = s.device === "cuda"
        ? `${gpus.length} × ${gpus[0] && gpus[0].name ? gpus[0].name : "GPU"} on ${s.host}`
        : `CPU (${s.cpu_count ?? "?"} cores) on ${s.host}`;
      const age = Math.max(0, Date.now() / 1000 - s.time);
      body.dataset.device = s.device;
      body.replaceChildren(
        row("Device", h("b", { id: "sys-device" }, device)),
        row("Trainer RAM", h("span", { id: "sys-memory" }, p.rss_bytes === undefined ? "–" : bytes(p.rss_bytes)),
          s.ram_total_bytes ? h("span", { className: "muted" },
            ` (host RAM ${bytes(s.ram_used_bytes)} of ${bytes(s.ram_total_bytes)} in use)`) : ""),
        row("Trainer CPU", p.cpu_percent === undefined ? "measuring…" : meter(p.cpu_percent),
          p.cpu_percent === undefined ? "" : h("span", { id: "sys-cpu" }, ` ${p.cpu_percent}% of all cores`)),
        ...gpuRows(gpus),
        h("div", { className: "muted small" }, job.status === "running" || job.status === "starting"
          ? `heartbeat ${Math.round(age)} s ago` : `last heartbeat, ${new Date(s.time * 1000).toLocaleString()}`));
    },
  };
}
