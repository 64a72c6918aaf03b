// The job page: live header, curves, events, log tail, sample slider, checkpoints with export and generate.
import { CANCELLABLE, RESUMABLE, TERMINAL, api, blobUrl, duration, events, h, rate, request } from "./api.js";
import { makeChart } from "./chart.js";

const LOG_POLL_MS = 2000;
const LOG_KEEP = 200_000; // characters of log kept on screen
const HISTORY_POINTS = 2000; // per curve: a long run's past is drawn thinned, the live tail in full

const order = (key) => `${/loss/.test(key) ? 0 : /grad_norm/.test(key) ? 1 : 2}${key}`;

export function jobPage(root, id) {
  const ctrl = new AbortController();
  const timers = new Set();
  const blobs = new Set();
  const charts = new Map(); // metric key -> {chart, x, y}
  let job = null;
  let lastEvent = 0;
  let logOffset = 0;
  let seenStep = -1;
  let streaming = false;
  let historyEnd = -1; // the stream starts after this step once a thinned history was drawn
  let gone = false; // a 404: no such job of ours, so stop asking

  const el = {
    title: h("h1", {}, id),
    status: h("span", { className: "status", id: "job-status" }),
    progress: h("progress", { id: "job-progress", max: 1, value: 0 }),
    steps: h("span", { id: "job-steps" }),
    rate: h("span"), eta: h("span"),
    error: h("div", { className: "error", id: "job-error" }),
    cancel: h("button", { type: "button", id: "cancel", className: "secondary", disabled: true }, "Cancel"),
    resume: h("button", { type: "button", id: "resume", className: "secondary", disabled: true }, "Resume"),
    charts: h("div", { className: "charts", id: "charts" }),
    noMetrics: h("p", { className: "muted" }, "No metrics yet."),
    events: h("ul", { className: "events", id: "events" }),
    log: h("pre", { className: "log", id: "log" }),
    slider: h("input", { type: "range", id: "sample-step", min: 0, max: 0, value: 0, disabled: true }),
    sampleLabel: h("div", { className: "muted" }, "No samples yet."),
    sample: h("img", { className: "sample", id: "sample", alt: "sample grid", hidden: true }),
    checkpoints: h("div", { id: "checkpoints" }, h("p", { className: "muted" }, "No checkpoints yet.")),
  };
  root.replaceChildren(
    el.title,
    h("section", { className: "card" },
      h("div", { className: "row" },
        h("div", {}, h("label", {}, "Status"), el.status),
        h("div", {}, h("label", {}, "Progress"), el.progress, " ", el.steps),
        h("div", {}, h("label", {}, "Steps/s"), el.rate),
        h("div", {}, h("label", {}, "ETA"), el.eta),
        h("div", {}, el.cancel, " ", el.resume)),
      el.error),
    h("section", { className: "card" }, h("h2", {}, "Curves"), el.noMetrics, el.charts),
    h("div", { className: "grid2" },
      h("section", { className: "card" }, h("h2", {}, "Events"), el.events),
      h("section", { className: "card" }, h("h2", {}, "Trainer log"), el.log)),
    h("section", { className: "card" }, h("h2", {}, "Samples"), el.slider, el.sampleLabel, el.sample),
    h("section", { className: "card" }, h("h2", {}, "Checkpoints"), el.checkpoints));

  const later = (fn, ms) => { const t = setTimeout(() => { timers.delete(t); fn(); }, ms); timers.add(t); };
  const show = (err) => { if (!ctrl.signal.aborted) el.error.textContent = err.message; };

  function renderJob(next) {
    job = next;
    const { step, total_steps: total, eta } = job.progress;
    el.title.textContent = job.name ? `${job.name} (${job.id})` : job.id;
    el.status.textContent = job.status;
    el.status.className = `status ${job.status}`;
    el.progress.max = total || 1;
    el.progress.value = step;
    el.steps.textContent = `${step}/${total}`;
    el.rate.textContent = rate(job.progress.rate);
    el.eta.textContent = job.status === "succeeded" ? "done" : duration(eta);
    // The buttons follow the state machine: cancel while it can still stop, resume once it stopped or failed.
    el.cancel.disabled = !CANCELLABLE.has(job.status);
    el.resume.disabled = !RESUMABLE.has(job.status);
    el.error.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    if (step !== seenStep || TERMINAL.has(job.status)) {
      seenStep = step;
      refreshSamples().catch(show);
      refreshCheckpoints().catch(show);
    }
  }

  function addEvents(list) {
    for (const e of list) {
      lastEvent = Math.max(lastEvent, e.id);
      el.events.append(h("li", {}, h("span", { className: "muted" }, new Date(e.time).toLocaleTimeString()), " ",
        h("b", {}, e.kind), " ", e.message));
    }
    el.events.scrollTop = el.events.scrollHeight;
  }

  function addMetrics(byKey) {
    for (const [key, points] of Object.entries(byKey)) {
      let entry = charts.get(key);
      if (!entry) {
        const box = h("div", { className: "chart", dataset: { key } });
        // Losses first, then gradient norms, then the rest, each in key order, whatever order they arrive in.
        const after = [...el.charts.children].find((c) => order(c.dataset.key) > order(key));
        el.charts.insertBefore(box, after || null);
        entry = { box, chart: makeChart(box, { title: key, labels: [key] }), x: [], y: [] };
        charts.set(key, entry);
        el.noMetrics.hidden = true;
      }
      const last = entry.x.length ? entry.x.at(-1) : -1;
      for (const p of points) {
        if (p.step > last) { entry.x.push(p.step); entry.y.push(p.value); }
      }
      entry.chart.setData([entry.x, entry.y]);
      entry.box.dataset.points = entry.x.length; // what is drawn, for tests and for the curious
    }
  }

  // A long run's history, thinned to about HISTORY_POINTS per key with the metrics endpoint's stride, so
  // the stream only has to send what comes after it (a million steps would otherwise all go to the page).
  async function loadHistory() {
    const current = await api(`/jobs/${id}`, { signal: ctrl.signal });
    const stride = Math.floor(current.progress.step / HISTORY_POINTS);
    if (stride < 2) return; // short enough to stream in full
    const { keys } = await api(`/jobs/${id}/metrics?limit=1`, { signal: ctrl.signal });
    historyEnd = current.progress.step;
    for (const key of keys) {
      let since = -1;
      for (;;) {
        const page = await api(`/jobs/${id}/metrics?key=${encodeURIComponent(key)}&stride=${stride}` +
                               `&since_step=${since}&limit=20000`, { signal: ctrl.signal });
        addMetrics({ [key]: page.points });
        if (!page.has_more || !page.points.length) break;
        since = page.points.at(-1).step;
      }
    }
  }

  async function follow() {
    if (streaming) return;
    streaming = true;
    try {
      while (!ctrl.signal.aborted) {
        // Reconnecting: from the curve that is furthest behind (duplicates are dropped in addMetrics), but
        // never from before the thinned history, whose sparse keys would drag the whole past back in.
        const lasts = [...charts.values()].map((c) => (c.x.length ? c.x.at(-1) : -1));
        const since = Math.max(historyEnd, lasts.length ? Math.min(...lasts) : -1);
        let ended = false;
        try {
          for await (const msg of events(`/jobs/${id}/stream?after=${lastEvent}&since_step=${since}`, ctrl.signal)) {
            if (msg.event === "job") renderJob(msg.data);
            else if (msg.event === "events") addEvents(msg.data);
            else if (msg.event === "metrics") addMetrics(msg.data);
            else if (msg.event === "end") ended = true;
          }
        } catch (err) {
          if (ctrl.signal.aborted || err.status === 404) { if (err.status === 404) show(err); return; }
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
        const response = await request(`/jobs/${id}/logs?offset=${logOffset}&limit=262144`, { signal: ctrl.signal });
        const text = await response.text();
        logOffset = Number(response.headers.get("X-Next-Offset"));
        if (text) {
          const atBottom = el.log.scrollTop + el.log.clientHeight >= el.log.scrollHeight - 8;
          // tqdm redraws its bar with carriage returns: keep what a terminal would show, the last redraw.
          el.log.textContent = (el.log.textContent + text).replace(/[^\n]*\r(?!\n|$)/g, "").slice(-LOG_KEEP);
          if (atBottom) el.log.scrollTop = el.log.scrollHeight;
        }
        if (text.length < 262144) break; // caught up
      }
    } catch (err) {
      gone = gone || err.status === 404;
      if (!ctrl.signal.aborted) show(err);
    }
  }

  function pollLog() {
    if (ctrl.signal.aborted || gone) return;
    tailLog().finally(() => { if (!job || !TERMINAL.has(job.status)) later(pollLog, LOG_POLL_MS); });
  }

  let samples = [];
  const sampleUrls = new Map();
  async function showSample() {
    const sample = samples[Number(el.slider.value)];
    if (!sample) return;
    el.sampleLabel.textContent = `step ${sample.step} (${Number(el.slider.value) + 1} of ${samples.length})`;
    if (!sampleUrls.has(sample.step)) {
      const { url } = await blobUrl(sample.url, { signal: ctrl.signal });
      blobs.add(url);
      sampleUrls.set(sample.step, url);
    }
    el.sample.src = sampleUrls.get(sample.step);
    el.sample.hidden = false;
  }
  el.slider.addEventListener("input", () => showSample().catch(show));

  async function refreshSamples() {
    const page = await api(`/jobs/${id}/samples`, { signal: ctrl.signal });
    if (page.data.length === samples.length) return;
    const atEnd = Number(el.slider.value) >= samples.length - 1;
    samples = page.data;
    el.slider.max = Math.max(0, samples.length - 1);
    el.slider.disabled = samples.length < 2;
    if (atEnd) el.slider.value = samples.length - 1; // follow the newest grid unless the user moved away
    await showSample();
  }

  let checkpointSteps = "";
  async function refreshCheckpoints() {
    const page = await api(`/jobs/${id}/checkpoints`, { signal: ctrl.signal });
    const steps = page.data.map((c) => c.step).join(",");
    if (steps === checkpointSteps) return; // keep any prompt the user is typing
    checkpointSteps = steps;
    if (!page.data.length) return;
    el.checkpoints.replaceChildren(...page.data.slice().reverse().map(checkpointBox));
  }

  function checkpointBox(ckpt) {
    const prompt = h("input", { name: "prompt", value: "a handwritten digit seven", size: 30, required: true });
    const seed = h("input", { name: "seed", type: "number", value: 0, min: 0, size: 6 });
    const steps = h("input", { name: "steps", type: "number", min: 1, max: 1000, placeholder: "K", size: 4 });
    const out = h("img", { className: "generated", alt: "generated image", hidden: true });
    const msg = h("div", { className: "field-error" });
    const button = h("button", { type: "submit" }, "Generate");
    const form = h("form", { className: "generate row" },
      h("div", {}, h("label", {}, "Prompt"), prompt), h("div", {}, h("label", {}, "Seed"), seed),
      h("div", {}, h("label", {}, "Steps"), steps), h("div", {}, button));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      msg.textContent = "";
      button.disabled = true;
      const body = { checkpoint: ckpt.path, prompt: prompt.value, seed: Number(seed.value || 0) };
      if (steps.value) body.steps = Number(steps.value);
      try {
        const { url } = await blobUrl("/generate", { method: "POST", body, signal: ctrl.signal });
        blobs.add(url);
        out.src = url;
        out.hidden = false;
      } catch (err) {
        msg.textContent = err.message;
      } finally {
        button.disabled = false;
      }
    });
    return h("div", { className: "checkpoint", dataset: { step: ckpt.step } },
      h("b", {}, `step ${ckpt.step}`), " ", h("code", {}, ckpt.path),
      h("div", { className: "muted" }, "Export: ",
        h("code", {}, `flashdmd export ${ckpt.path} --format diffusers`),
        " (or unet, lora, lora-kohya)"),
      form, msg, out);
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
    charts.forEach((c) => c.chart.destroy());
    blobs.forEach((url) => URL.revokeObjectURL(url));
  };
}
