// The REST client: the token lives in sessionStorage and goes out as a bearer header, never in a URL.
const KEY = "flashdmd.token";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code;
    this.fields = error.fields || [];
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${token.get() || ""}`, ...extra };
}

// Every call goes through here: a 401 means the token is gone or revoked, so back to the login page.
// `body` goes as JSON; `text` as it is, with its `type` (the YAML spec editor).
export async function request(path, { method = "GET", body, text, type, signal } = {}) {
  const sent = text !== undefined ? { "Content-Type": type }
    : body !== undefined ? { "Content-Type": "application/json" } : {};
  const init = { method, signal, headers: headers(sent) };
  if (text !== undefined) init.body = text;
  else if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (response.status === 401 && location.hash !== "#/login") { // the login page reports it itself
    token.clear();
    location.hash = "#/login";
  }
  if (!response.ok) {
    let parsed = null;
    try { parsed = await response.json(); } catch { /* not JSON: keep the status */ }
    throw new ApiError(response.status, parsed);
  }
  return response;
}

export const api = async (path, options) => (await request(path, options)).json();

// Images need the bearer header too, so they are fetched and shown from blob: URLs (the CSP allows those).
export async function blobUrl(path, options) {
  const response = await request(path, options);
  return { url: URL.createObjectURL(await response.blob()), response };
}

// Server-sent events over fetch: EventSource cannot send an Authorization header.
export async function* events(path, signal) {
  const response = await request(path, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event: name, data: JSON.parse(data.join("\n")) };
    }
  }
}

// A tiny element builder: h("a", {href: "#/"}, "text", child).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && key !== "list") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const CANCELLABLE = new Set(["queued", "recovering", "starting", "running"]);
export const RESUMABLE = new Set(["cancelled", "failed"]);

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

// What a terminal would show: no colour or cursor escape codes (tqdm, colourised loggers), and of a line
// redrawn with carriage returns only its last drawing. The trainer should not write them; this is the net.
const ESCAPES = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;
export const stripAnsi = (text) => text.replace(ESCAPES, "").replace(/[^\n]*\r(?!\n|$)/g, "");

export const rate = (value) => (value ? `${value.toFixed(2)}` : "–");
