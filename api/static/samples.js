// Sample grids: a step slider, the grid with its prompts as captions (and on hover per cell), and a
// lightbox that shows the grid at full size (Esc or a click outside closes it, arrow keys change the step).
import { blobUrl, h } from "./api.js";

// The prompts in grid order, each with the seeds and rows it appears in: one line per prompt, not per cell.
function captions(cells) {
  const byPrompt = new Map();
  for (const c of cells) {
    if (!byPrompt.has(c.prompt)) byPrompt.set(c.prompt, { rows: new Set(), seeds: [] });
    const entry = byPrompt.get(c.prompt);
    entry.rows.add(c.row + 1);
    entry.seeds.push(c.seed);
  }
  return h("ol", { className: "captions" }, [...byPrompt].map(([prompt, { rows, seeds }]) =>
    h("li", {}, h("span", { className: "prompt" }, prompt || "(empty prompt)"), " ",
      h("span", { className: "muted" }, `row ${[...rows].join(", ")} · seed${seeds.length > 1 ? "s" : ""} `
        + seeds.join(", ")))));
}

// Invisible cells over the image: hovering one names its prompt and seed.
function cellOverlay(cells) {
  if (!cells.length) return null;
  const rows = Math.max(...cells.map((c) => c.row)) + 1;
  const cols = Math.max(...cells.map((c) => c.col)) + 1;
  return h("div", { className: "cells", style: `grid-template: repeat(${rows}, 1fr) / repeat(${cols}, 1fr)` },
    cells.map((c) => h("div", { title: `${c.prompt} (seed ${c.seed})`,
                                style: `grid-area: ${c.row + 1} / ${c.col + 1}` })));
}

export function samplesPanel({ signal, blobs, onError }) {
  let samples = [];
  const urls = new Map();
  const slider = h("input", { type: "range", id: "sample-step", min: 0, max: 0, value: 0, disabled: true,
                              "aria-label": "sample step" });
  const label = h("div", { className: "muted" }, "No samples yet.");
  const image = h("img", { className: "sample", id: "sample", alt: "sample grid", hidden: true,
                           title: "click to zoom" });
  const frame = h("div", { className: "sample-frame", tabIndex: 0, role: "button", "aria-label": "zoom the grid" },
    image);
  const caption = h("div", { id: "sample-captions" });
  const el = h("section", { className: "card", id: "samples" }, h("h2", {}, "Samples"), slider, label,
    h("figure", { className: "sample-figure" }, frame, h("figcaption", {}, caption)));

  const zoomImg = h("img", { className: "zoomed", alt: "sample grid at full size" });
  const zoomCaption = h("div", { className: "zoom-caption" });
  const closeButton = h("button", { type: "button", className: "secondary close", title: "close (Esc)" }, "×");
  const lightbox = h("div", { className: "lightbox", id: "lightbox", role: "dialog", "aria-modal": "true",
                              "aria-label": "sample grid", hidden: true },
    h("div", { className: "lightbox-body" }, closeButton, zoomImg, zoomCaption));

  const current = () => samples[Number(slider.value)];

  async function urlOf(sample) {
    if (!urls.has(sample.step)) {
      const { url } = await blobUrl(sample.url, { signal });
      blobs.add(url);
      urls.set(sample.step, url);
    }
    return urls.get(sample.step);
  }

  // Full size, or a whole multiple of it when the grid is small (a 32 px digit is unreadable at 1x).
  function fitZoom() {
    const { naturalWidth: w, naturalHeight: hgt } = zoomImg;
    if (!w) return;
    const scale = Math.max(1, Math.floor(Math.min((innerWidth * 0.9) / w, (innerHeight * 0.75) / hgt)));
    zoomImg.style.width = `${w * scale}px`;
    zoomImg.dataset.scale = scale;
  }
  zoomImg.addEventListener("load", fitZoom);

  async function show() {
    const sample = current();
    if (!sample) return;
    label.textContent = `step ${sample.step} (${Number(slider.value) + 1} of ${samples.length})`;
    image.src = await urlOf(sample);
    image.hidden = false;
    const overlay = cellOverlay(sample.cells || []);
    frame.replaceChildren(image, ...(overlay ? [overlay] : []));
    caption.replaceChildren(sample.cells && sample.cells.length ? captions(sample.cells)
      : h("p", { className: "muted" }, "No prompts recorded for this grid."));
    if (!lightbox.hidden) zoom();
  }

  function zoom() {
    const sample = current();
    if (!sample || !urls.has(sample.step)) return;
    zoomImg.src = urls.get(sample.step);
    zoomCaption.replaceChildren(h("b", {}, `step ${sample.step}`), captions(sample.cells || []));
    lightbox.hidden = false;
    document.body.classList.add("no-scroll");
    closeButton.focus();
  }
  function close() {
    if (lightbox.hidden) return;
    lightbox.hidden = true;
    document.body.classList.remove("no-scroll");
    if (frame.isConnected) frame.focus(); // back where the keyboard was
  }
  function step(by) {
    const next = Math.min(samples.length - 1, Math.max(0, Number(slider.value) + by));
    if (next !== Number(slider.value)) { slider.value = next; show().catch(onError); }
  }
  function onKey(event) {
    if (lightbox.hidden) return;
    if (event.key === "Escape") close();
    else if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
  }

  frame.addEventListener("click", zoom);
  frame.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); zoom(); }
  });
  closeButton.addEventListener("click", close);
  lightbox.addEventListener("click", (event) => { if (event.target === lightbox) close(); });
  document.addEventListener("keydown", onKey);
  slider.addEventListener("input", () => show().catch(onError));
  document.body.append(lightbox);

  return {
    el,
    async update(page) {
      // A grid's captions may arrive after its image (the ingest reads step-N.json at its next resync).
      const captioned = (list) => list.filter((s) => s.cells && s.cells.length).length;
      if (page.data.length === samples.length && captioned(page.data) === captioned(samples)) return;
      const atEnd = Number(slider.value) >= samples.length - 1;
      samples = page.data;
      slider.max = Math.max(0, samples.length - 1);
      slider.disabled = samples.length < 2;
      if (atEnd) slider.value = samples.length - 1; // follow the newest grid unless the user moved away
      await show();
    },
    destroy() {
      document.removeEventListener("keydown", onKey);
      close();
      lightbox.remove();
    },
  };
}
