// One generate form per job: pick a checkpoint; steps offer only what it was distilled for, and the export
// hints list only the formats it can be exported to (a full-weight generator has no LoRA to export).
import { blobUrl, h } from "./api.js";

export function generatePanel({ signal, blobs }) {
  let checkpoints = [];
  let shown = "";
  const select = h("select", { name: "checkpoint", id: "gen-checkpoint" });
  const prompt = h("input", { name: "prompt", value: "a handwritten digit seven", size: 30, required: true });
  const seed = h("input", { name: "seed", type: "number", value: 0, min: 0, size: 6 });
  const steps = h("select", { name: "steps", id: "gen-steps" });
  const button = h("button", { type: "submit" }, "Generate");
  const msg = h("div", { className: "field-error" });
  const out = h("img", { className: "generated", alt: "generated image", hidden: true });
  const where = h("div", { className: "muted", id: "gen-path" });
  const exports = h("ul", { className: "exports", id: "export-hints" });
  const form = h("form", { className: "generate", id: "generate", hidden: true },
    h("div", { className: "row" },
      h("div", {}, h("label", { htmlFor: "gen-checkpoint" }, "Checkpoint"), select),
      h("div", {}, h("label", {}, "Prompt"), prompt),
      h("div", {}, h("label", {}, "Seed"), seed),
      h("div", {}, h("label", { htmlFor: "gen-steps" }, "Steps"), steps),
      h("div", {}, button)),
    msg, out, where, h("div", { className: "muted" }, "Export this checkpoint:"), exports);
  const none = h("p", { className: "muted" }, "No checkpoints yet.");
  const el = h("section", { className: "card", id: "checkpoints" }, h("h2", {}, "Generate and export"), none, form);

  const chosen = () => checkpoints.find((c) => String(c.step) === select.value) || checkpoints[0];

  function describe() {
    const ckpt = chosen();
    if (!ckpt) return;
    const own = ckpt.meta.num_steps;
    const before = steps.value;
    steps.replaceChildren(...ckpt.steps.map((n) => h("option", { value: n, selected: String(n) === before },
      n === own ? `${n} (trained)` : String(n))));
    steps.disabled = ckpt.steps.length < 2; // nothing to choose: the one K it was trained for
    where.replaceChildren("Path: ", h("code", {}, ckpt.path));
    exports.replaceChildren(...ckpt.formats.map((fmt) => h("li", { dataset: { format: fmt } },
      h("code", {}, `flashdmd export ${ckpt.path} --format ${fmt}`))));
  }
  select.addEventListener("change", describe);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    msg.textContent = "";
    button.disabled = true;
    const ckpt = chosen();
    const body = { checkpoint: ckpt.path, prompt: prompt.value, seed: Number(seed.value || 0) };
    if (steps.value) body.steps = Number(steps.value);
    try {
      const { url } = await blobUrl("/generate", { method: "POST", body, signal });
      blobs.add(url);
      out.src = url;
      out.hidden = false;
    } catch (err) {
      msg.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  });

  return {
    el,
    update(page) {
      const key = page.data.map((c) => c.step).join(",");
      if (key === shown) return; // keep what the user is typing
      shown = key;
      const wasNewest = !checkpoints.length || select.value === String(checkpoints[0].step);
      checkpoints = page.data.slice().reverse(); // newest first
      const keep = select.value;
      select.replaceChildren(...checkpoints.map((c) => h("option", { value: c.step },
        `step ${c.step} · ${c.meta.generator || "?"}${c.meta.lora ? " (LoRA)" : ""}`)));
      // Follow the newest checkpoint unless the user picked an older one.
      const kept = checkpoints.some((c) => String(c.step) === keep);
      select.value = wasNewest || !kept ? String(checkpoints[0]?.step) : keep;
      none.hidden = checkpoints.length > 0;
      form.hidden = checkpoints.length === 0;
      describe();
    },
  };
}
