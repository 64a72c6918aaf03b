// Which section of the job page a metric key's chart goes to: one small table, read top to bottom.
//
// A key joins the first group whose rule matches. Whatever says nothing is folded into "other" (collapsed):
// keys that are noise by nature (the turn flag, random timesteps), counters while they are all
// zero (a skipped or non-finite step is news, so a non-zero counter comes back out, under health), and
// any key whose values have all been equal for a while (a fixed learning rate, a constant scale).
export const GROUPS = [
  // [id, title, rule]
  ["losses", "Losses", (k) => k.startsWith("loss/") || /(^|\/)loss$/.test(k)],
  ["grad", "Gradient norms", (k) => k.startsWith("grad_norm/") || k.includes("grad_norm")],
  ["health", "Health", (k) => /^(health|guard|nonfinite|skipped)\//.test(k)],
  ["disc", "Discriminator", (k) => k.startsWith("disc/")],
  ["reward", "Reward", (k) => /^(rl|lrm|reward)\//.test(k)],
  ["schedule", "Schedule", (k) => /^(lr|time|amp|ema|gan|sched)\//.test(k) || /(^|\/)lr$/.test(k)],
  ["misc", "More", () => true],
];
export const OTHER = ["other", "Other (constants, counters at zero, random timesteps and turns)"];

// Drawn at random every step (which network's turn, which timestep, which of the K steps): their curves are noise.
const NOISE = /^generator_turn$|(^|\/)(timestep|step_index)$/;
const COUNTER = /^(skipped|nonfinite)\/|(^|\/)(count|total)$/;
const FLAT_AFTER = 3; // points before an unchanging key counts as a constant (one point says nothing yet)

// The group id for a key, given the values seen so far (nulls, i.e. NaN or infinity, are ignored).
export function groupOf(key, values) {
  if (NOISE.test(key)) return OTHER[0];
  let min = Infinity;
  let max = -Infinity;
  let n = 0;
  for (const v of values) {
    if (v === null || v === undefined) continue;
    n += 1;
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (COUNTER.test(key) && (n === 0 || (min === 0 && max === 0))) return OTHER[0];
  if (n >= FLAT_AFTER && min === max) return OTHER[0];
  return GROUPS.find(([, , rule]) => rule(key))[0];
}

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
export function ema(values, weight) {
  if (!weight) return values;
  const out = new Array(values.length);
  let last = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined || !Number.isFinite(v)) { out[i] = null; continue; }
    last = last * weight + (1 - weight) * v;
    count += 1;
    out[i] = last / (1 - weight ** count);
  }
  return out;
}

// Settings kept across pages and reloads: the smoothing weight, log scale, and pinned or hidden keys.
const STORE = "flashdmd.charts";
export const prefs = {
  load() {
    const defaults = { smoothing: 0.6, log: false, pinned: [], hidden: [] };
    try {
      const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
      return { smoothing: Number.isFinite(saved.smoothing) ? saved.smoothing : defaults.smoothing,
               log: saved.log === true,
               pinned: Array.isArray(saved.pinned) ? saved.pinned : [],
               hidden: Array.isArray(saved.hidden) ? saved.hidden : [] };
    } catch {
      return defaults; // unreadable (edited by hand, another version): start over
    }
  },
  save(value) { localStorage.setItem(STORE, JSON.stringify(value)); },
};
