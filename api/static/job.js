// The job page: live header, grouped curves, system, events, log tail, samples, one generate form.
import { CANCELLABLE, RESUMABLE, TERMINAL, api, duration, events, h, rate, request, stripAnsi } from "./api.js";
import { curvesPanel } from "./curves.js";
import { generatePanel } from "./generate.js";
import { samplesPanel } from "./samples.js";
import { systemPanel } from "./system.js";

const LOG_POLL_MS = 2000;
const LOG_KEEP = 200_000; // characters of log kept on screen
const HISTORY_POINTS = 2000; // per curve: a long run's past is drawn thinned, the live tail in full
const RESUME_COLOR = "#c98a00";
const GUARD_COLOR = "#c62f2f";

// The ETA only means something while the job runs: a cancelled or failed job has none (not "0 s").
export function etaText(job) {
  if (job.status === "succeeded") return "done";
  if (job.status !== "running" && job.status !== "starting") return "–";
  return duration(job.progress.eta);
}

// Where a chart gets a vertical line: each resume (the trainer's `started` event says it resumed, and from
// which step; the worker's `claimed` event names the checkpoint it resumes from) and each guard warning.
function markerOf(e) {
  const d = e.data || {};
  const resume = (step) => ({ step, kind: "resume", color: RESUME_COLOR });
  if (e.kind === "started" && d.resumed && Number.isFinite(d.step)) return resume(d.step);
  if (e.kind === "claimed" && Number.isFinite(d.resume_step)) return resume(d.resume_step);
  if (e.kind === "guard" && Number.isFinite(d.step)) return { step: d.step, kind: "guard", color: GUARD_COLOR };
  return null;
}

export function jobPage(root, id) {
  const ctrl = new AbortController();
  const { signal } = ctrl;
  const timers = new Set();
  const blobs = new Set();
  const markers = new Map(); // "kind@step" -> marker
  let job = null;
  let lastEvent = 0;
  let logOffset = 0;
  let logRaw = "";
  let seenStep = -1;
  let streaming = false;
  let historyEnd = -1; // the stream starts after this step once a thinned history was drawn
  let gone = false; // a 404: no such job of ours, so stop asking

  const show = (err) => { if (!signal.aborted) el.error.textContent = err.message; };
  const curves = curvesPanel();
  const system = systemPanel();
  const samples = samplesPanel({ signal, blobs, onError: show });
  const generate = generatePanel({ signal, blobs });
  const el = {
    title: h("h1", {}, id),
    status: h("span", { className: "status", id: "job-status" }),
    progress: h("progress", { id: "job-progress", max: 1, value: 0 }),
    steps: h("span", { id: "job-steps" }),
    rate: h("span"), eta: h("span", { id: "job-eta" }),
    error: h("div", { className: "error", id: "job-error" }),
    guard: h("div", { className: "alert", id: "guard-alert", hidden: true }),
    cancel: h("button", { type: "button", id: "cancel", className: "secondary", disabled: true }, "Cancel"),
    resume: h("button", { type: "button", id: "resume", className: "secondary", disabled: true }, "Resume"),
    clone: h("a", { className: "button secondary", id: "clone", href: `#/new?from=${encodeURIComponent(id)}`,
                    title: "a new job with this one's spec, to edit and submit" }, "Clone"),
    events: h("ul", { className: "events", id: "events" }),
    log: h("pre", { className: "log", id: "log" }),
  };
  root.replaceChildren(
    el.title,
    h("section", { className: "card" },
      h("div", { className: "row" },
        h("div", {}, h("label", {}, "Status"), el.status),
        h("div", {}, h("label", {}, "Progress"), el.progress, " ", el.steps),
        h("div", {}, h("label", {}, "Steps/s"), el.rate),
        h("div", {}, h("label", {}, "ETA"), el.eta),
        h("div", {}, el.cancel, " ", el.resume, " ", el.clone)),
      el.guard, el.error),
    curves.el,
    h("div", { className: "grid2" }, samples.el, system.el),
    h("div", { className: "grid2" },
      h("section", { className: "card" }, h("h2", {}, "Events"), el.events),
      h("section", { className: "card" }, h("h2", {}, "Trainer log"), el.log)),
    generate.el);

  const later = (fn, ms) => { const t = setTimeout(() => { timers.delete(t); fn(); }, ms); timers.add(t); };

  function renderJob(next) {
    job = next;
    const { step, total_steps: total } = job.progress;
    el.title.textContent = job.name ? `${job.name} (${job.id})` : job.id;
    el.status.textContent = job.status;
    el.status.className = `status ${job.status}`;
    el.progress.max = total || 1;
    el.progress.value = step;
    el.steps.textContent = `${step}/${total}`;
    el.rate.textContent = rate(job.progress.rate);
    el.eta.textContent = etaText(job);
    // The buttons follow the state machine: cancel while it can still stop, resume once it stopped or failed.
    el.cancel.disabled = !CANCELLABLE.has(job.status);
    el.resume.disabled = !RESUMABLE.has(job.status);
    el.error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    system.update(job);
    if (step !== seenStep || TERMINAL.has(job.status)) {
      seenStep = step;
      api(`/jobs/${id}/samples`, { signal }).then(samples.update).catch(show);
      api(`/jobs/${id}/checkpoints`, { signal }).then(generate.update).catch(show);
    }
  }

  function addEvents(list) {
    for (const e of list) {
      lastEvent = Math.max(lastEvent, e.id);
      const step = e.data && Number.isFinite(e.data.step) ? ` (step ${e.data.step})` : "";
      el.events.append(h("li", { className: e.kind === "guard" || e.kind === "failed" ? "warn" : "",
                                 dataset: { kind: e.kind } },
        h("span", { className: "muted" }, new Date(e.time).toLocaleTimeString()), " ",
        h("b", {}, e.kind), " ", e.message, h("span", { className: "muted" }, step)));
      const marker = markerOf(e);
      if (marker) markers.set(`${marker.kind}@${marker.step}`, marker);
      if (e.kind === "guard") {
        el.guard.hidden = false;
        el.guard.textContent = `Collapse guard${step}: ${e.message}`;
      }
    }
    curves.setMarkers([...markers.values()].sort((a, b) => a.step - b.step));
    el.events.scrollTop = el.events.scrollHeight;
  }

  // A long run's history, thinned to about HISTORY_POINTS per key with the metrics endpoint's stride, so
  // the stream only has to send what comes after it (a million steps would otherwise all go to the page).
  async function loadHistory() {
    const current = await api(`/jobs/${id}`, { signal });
    const stride = Math.floor(current.progress.step / HISTORY_POINTS);
    if (stride < 2) return; // short enough to stream in full
    const { keys } = await api(`/jobs/${id}/metrics?limit=1`, { signal });
    historyEnd = current.progress.step;
    for (const key of keys) {
      let since = -1;
      for (;;) {
        const page = await api(`/jobs/${id}/metrics?key=${encodeURIComponent(key)}&stride=${stride}` +
                               `&since_step=${since}&limit=20000`, { signal });
        curves.add({ [key]: page.points });
        if (!page.has_more || !page.points.length) break;
        since = page.points.at(-1).step;
      }
    }
  }

  async function follow() {
    if (streaming) return;
    streaming = true;
    try {
      while (!signal.aborted) {
        // Reconnecting: from the curve that is furthest behind (duplicates are dropped by the panel), but
        // never from before the thinned history, whose sparse keys would drag the whole past back in.
        const lasts = curves.lastSteps();
        const since = Math.max(historyEnd, lasts.length ? Math.min(...lasts) : -1);
        let ended = false;
        try {
          for await (const msg of events(`/jobs/${id}/stream?after=${lastEvent}&since_step=${since}`, signal)) {
            if (msg.event === "job") renderJob(msg.data);
            else if (msg.event === "events") addEvents(msg.data);
            else if (msg.event === "metrics") curves.add(msg.data);
            else if (msg.event === "end") ended = true;
          }
        } catch (err) {
          if (signal.aborted || err.status === 404) { if (err.status === 404) show(err); return; }
          show(err);
        }
        if (ended) { tailLog(); return; }
        await new Promise((resolve) => later(resolve, 2000)); // the connection dropped: reconnect
      }
    } finally {
      streaming = false;
    }
  }

  async function tailLog() {
    try {
      for (;;) {
        const response = await request(`/jobs/${id}/logs?offset=${logOffset}&limit=262144`, { signal });
        const text = await response.text();
        logOffset = Number(response.headers.get("X-Next-Offset"));
        if (text) {
          const atBottom = el.log.scrollTop + el.log.clientHeight >= el.log.scrollHeight - 8;
          // The raw text is kept so an escape sequence cut between two reads is still whole when stripped.
          logRaw = (logRaw + text).slice(-LOG_KEEP);
          el.log.textContent = stripAnsi(logRaw);
          if (atBottom) el.log.scrollTop = el.log.scrollHeight;
        }
        if (text.length < 262144) break; // caught up
      }
    } catch (err) {
      gone = gone || err.status === 404;
      if (!signal.aborted) show(err);
    }
  }

  function pollLog() {
    if (signal.aborted || gone) return;
    tailLog().finally(() => { if (!job || !TERMINAL.has(job.status)) later(pollLog, LOG_POLL_MS); });
  }

  async function act(verb) {
    el.cancel.disabled = el.resume.disabled = true;
    try {
      renderJob(await api(`/jobs/${id}/${verb}`, { method: "POST" }));
      if (verb === "resume") { follow(); pollLog(); }
    } catch (err) {
      show(err);
    }
  }
  el.cancel.addEventListener("click", () => act("cancel"));
  el.resume.addEventListener("click", () => act("resume"));

  loadHistory().catch(show).finally(follow);
  pollLog();
  return () => {
    ctrl.abort();
    timers.forEach(clearTimeout);
    curves.destroy();
    samples.destroy();
    blobs.forEach((url) => URL.revokeObjectURL(url));
  };
}
