// bonsai-mlx studio: a single page over the server's job API (POST /jobs, the job's
// server-sent events, DELETE /jobs/{id}) and gallery (/gallery). No build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZES = [
  { label: "Square", w: 512, h: 512 }, { label: "Portrait", w: 432, h: 576 },
  { label: "Landscape", w: 576, h: 432 }, { label: "Square", w: 1024, h: 1024 },
  { label: "Portrait", w: 864, h: 1152 }, { label: "Landscape", w: 1152, h: 864 },
];
const STORE = "bonsai-studio-v1";

const state = {
  size: { w: 1024, h: 1024, mode: "preset" }, // mode: preset | custom | auto
  seedMode: "random",
  refs: [], // {file, url}
  job: null, // {id, source, n}
  health: null,
  shown: null, // gallery item on the stage
};

// ---- server -------------------------------------------------------------------------------

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    await signIn();
    return api(path, options);
  }
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    error.retryAfter = response.headers.get("Retry-After");
    throw error;
  }
  return body;
}

let signingIn = null; // one dialog, however many requests were refused
function signIn() {
  signingIn = signingIn || askForKey().finally(() => { signingIn = null; });
  return signingIn;
}

function askForKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").hidden = true;
    $("key-form").onsubmit = async (event) => {
      event.preventDefault();
      const response = await fetch("/session", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ key: $("key-input").value }),
      });
      if (response.ok) { dialog.close(); resolve(); return; }
      $("key-error").textContent = "That key is not right.";
      $("key-error").hidden = false;
    };
    if (!dialog.open) dialog.showModal();
  });
}

async function refreshHealth() {
  try {
    const health = await api("/health");
    state.health = health;
    const m = health.model;
    const chip = $("model-chip");
    chip.textContent = m.loaded
      ? `${m.id} · ${m.distilled ? "distilled" : "base"}, ${m.default_steps} steps`
      : `${m.id} · loads on first image`;
    chip.className = "chip " + (m.loaded ? "ok" : "wait");
    if (m.loaded) {
      $("steps").placeholder = m.default_steps;
      $("guidance").placeholder = m.default_guidance.toFixed(1);
      $("base-options").hidden = m.distilled;
    }
    const q = health.queue;
    $("queue-chip").textContent = q.running ? `busy · ${q.queued} waiting` : "";
  } catch (error) {
    $("model-chip").textContent = "server unreachable";
    $("model-chip").className = "chip";
  }
}

// ---- controls -------------------------------------------------------------------------------

function buildSizePresets() {
  const box = $("size-presets");
  SIZES.forEach((s) => box.append(sizeButton(`${s.label}<small>${s.w}×${s.h}</small>`, s)));
  box.append(sizeButton("Custom<small>any ×16</small>", { custom: true }));
  box.append(sizeButton("Same as image<small>1st reference</small>", { auto: true }, "auto-size"));
  updateSizeButtons();
}

function sizeButton(html, spec, id) {
  const b = document.createElement("button");
  b.type = "button";
  b.innerHTML = html;
  if (id) b.id = id;
  b.onclick = () => {
    if (spec.custom) state.size.mode = "custom";
    else if (spec.auto) state.size.mode = "auto";
    else setSize(spec.w, spec.h);
    updateSizeButtons();
    save();
  };
  b.dataset.w = spec.w || "";
  b.dataset.h = spec.h || "";
  b.dataset.kind = spec.custom ? "custom" : spec.auto ? "auto" : "preset";
  return b;
}

function setSize(w, h) {
  if (!w || !h) return;
  const preset = SIZES.some((s) => s.w === w && s.h === h);
  state.size = { w, h, mode: preset ? "preset" : "custom" };
  $("width").value = w;
  $("height").value = h;
}

function parseSize(text) {
  const m = /^(\d+)x(\d+)$/.exec(text || "");
  return m ? [Number(m[1]), Number(m[2])] : [null, null];
}

function updateSizeButtons() {
  const s = state.size;
  for (const b of $("size-presets").children) {
    const kind = b.dataset.kind;
    const on = (kind === "preset" && s.mode === "preset" && Number(b.dataset.w) === s.w && Number(b.dataset.h) === s.h)
      || (kind === s.mode && kind !== "preset");
    b.classList.toggle("on", on);
  }
  $("auto-size").hidden = state.refs.length === 0;
  if (s.mode === "auto" && state.refs.length === 0) state.size.mode = "preset";
  $("custom-size").hidden = s.mode !== "custom";
}

function setSeedMode(mode) {
  state.seedMode = mode;
  for (const b of $("seed-mode").children) b.classList.toggle("on", b.dataset.mode === mode);
  $("seed").placeholder = mode === "random" ? "random" : "seed";
  save();
}

function sizeField() {
  if (state.size.mode === "auto") return null;
  if (state.size.mode === "custom") return `${$("width").value}x${$("height").value}`;
  return `${state.size.w}x${state.size.h}`;
}

function requestFields(n, seed) {
  const fields = { prompt: $("prompt").value.trim(), n };
  const size = sizeField();
  if (size) fields.size = size;
  if (seed !== null && seed !== undefined) fields.seed = seed;
  if ($("steps").value) fields.steps = Number($("steps").value);
  if (!$("base-options").hidden) {
    if ($("guidance").value) fields.guidance = Number($("guidance").value);
    if ($("negative").value.trim()) fields.negative_prompt = $("negative").value.trim();
  }
  if (state.refs.length === 1 && $("img2img").checked) fields.strength = Number($("strength").value);
  return fields;
}

function nextSeed() {
  const value = $("seed").value;
  if (state.seedMode === "random" || value === "") return null;
  return Number(value);
}

// ---- generating -----------------------------------------------------------------------------

async function generate({ variations = false } = {}) {
  if (state.job) return;
  const prompt = $("prompt").value.trim();
  if (!prompt) { toast("Write a prompt first."); $("prompt").focus(); return; }
  const n = variations ? 4 : Number($("count").value);
  const fields = requestFields(n, variations ? null : nextSeed());
  let body, headers = {};
  if (state.refs.length) {
    body = new FormData();
    for (const [k, v] of Object.entries(fields)) body.append(k, String(v));
    state.refs.forEach((r) => body.append("image[]", r.file, r.file.name));
  } else {
    body = JSON.stringify(fields);
    headers = { "Content-Type": "application/json" };
  }
  save();
  try {
    const job = await api("/jobs", { method: "POST", body, headers });
    follow(job.id, n);
  } catch (error) {
    const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
    toast(error.message + wait);
  }
}

function follow(id, n) {
  const source = new EventSource(`/jobs/${id}/events`);
  state.job = { id, source, n, done: 0 };
  setBusy(true);
  showProgress(0, "Waiting…");
  const on = (type, handler) => source.addEventListener(type, (e) => handler(JSON.parse(e.data)));
  on("queued", (e) => showProgress(0, e.position > 1 ? `Queued · ${e.position - 1} ahead` : "Starting…"));
  on("loading", () => showProgress(0, "Loading the model…"));
  on("encode", (e) => showProgress(progressOf(e.image, 0, 1), `${imageLabel(e.image)}Reading the prompt…`));
  on("step", (e) => {
    if (e.preview) showPreview(e.preview);
    showProgress(progressOf(e.image, e.step, e.total), `${imageLabel(e.image)}Step ${e.step} / ${e.total}`);
  });
  on("decode", (e) => showProgress(progressOf(e.image, 1, 1), `${imageLabel(e.image)}Decoding…`));
  on("image", (e) => { state.job.done += 1; showImage(e); });
  on("done", () => finish());
  on("cancelled", () => { finish(); toast("Cancelled.", "info"); });
  on("error", (e) => { finish(); toast(e.message); });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && state.job && state.job.id === id) {
      finish();
      toast("Lost the connection to the server.");
    }
  };
}

function imageLabel(index) {
  return state.job && state.job.n > 1 ? `Image ${index + 1} of ${state.job.n} · ` : "";
}

function progressOf(image, step, total) {
  const n = state.job ? state.job.n : 1;
  return (image + (total ? step / total : 0)) / n;
}

async function finish() {
  if (state.job) state.job.source.close();
  state.job = null;
  setBusy(false);
  $("progress").hidden = true;
  $("stage").classList.remove("previewing");
  await loadGallery();
  refreshHealth();
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  showProgress(null, "Cancelling…");
  try { await api(`/jobs/${state.job.id}`, { method: "DELETE" }); } catch (error) { toast(error.message); }
}

function setBusy(busy) {
  if (busy) $("stage-info").hidden = true; // it described the previous picture
  $("generate").disabled = busy;
  $("variations").hidden = busy;
  $("cancel").hidden = !busy;
  $("cancel").disabled = false;
  $("generate").textContent = busy ? "Generating…" : "Generate";
}

function showProgress(fraction, text) {
  $("progress").hidden = false;
  if (fraction !== null) $("progress-bar").style.width = `${Math.round(fraction * 100)}%`;
  $("progress-text").textContent = text;
}

function showPreview(dataUrl) {
  const stage = $("stage");
  stage.classList.remove("empty");
  stage.classList.add("previewing");
  $("stage-img").src = dataUrl;
}

function showImage(event) {
  $("stage").classList.remove("previewing");
  $("stage-img").src = event.url;
  if (event.seed !== undefined && state.seedMode === "next") {
    $("seed").value = String(BigInt(event.seed) + 1n);
  } else if (event.seed !== undefined && state.seedMode === "random") {
    $("seed").placeholder = `random (last ${event.seed})`;
  }
}

// ---- gallery --------------------------------------------------------------------------------

async function loadGallery() {
  let items;
  try { items = (await api("/gallery?limit=300")).images; } catch (error) { return; }
  const box = $("gallery");
  const known = new Set([...box.querySelectorAll(".tile")].map((t) => t.dataset.name));
  box.replaceChildren(...items.map((item) => tile(item, known.size > 0 && !known.has(item.name))));
  if (!items.length) {
    const empty = document.createElement("p");
    empty.className = "gallery-empty";
    empty.textContent = "No images yet. They are saved in the server's output folder.";
    box.append(empty);
  }
  $("gallery-count").textContent = items.length ? `${items.length} image${items.length > 1 ? "s" : ""}, newest first` : "";
  if (items.length && (!state.shown || state.job === null)) showOnStage(items[0], false);
}

function tile(item, isNew) {
  const s = item.settings || {};
  const el = document.createElement("div");
  el.className = "tile" + (isNew ? " new" : "");
  el.dataset.name = item.name;
  el.tabIndex = 0;
  el.title = "Click: show and reuse these settings";
  const img = document.createElement("img");
  img.src = item.thumb;
  img.alt = s.prompt || item.name;
  img.loading = "lazy";
  const overlay = document.createElement("div");
  overlay.className = "overlay";
  const p = document.createElement("div");
  p.className = "p";
  p.textContent = s.prompt || item.name;
  const m = document.createElement("div");
  m.className = "m";
  m.textContent = settingsLine(s);
  overlay.append(p, m);
  const dl = document.createElement("a");
  dl.className = "button dl";
  dl.href = `${item.url}?download=1`;
  dl.download = item.name;
  dl.textContent = "⬇";
  dl.title = "Download";
  dl.onclick = (e) => e.stopPropagation();
  el.append(img, overlay, dl);
  const pick = () => { showOnStage(item, true); reuse(item.settings); };
  el.onclick = pick;
  el.onkeydown = (e) => { if (e.key === "Enter") pick(); };
  return el;
}

function settingsLine(s) {
  const parts = [];
  if (s.size) parts.push(s.size.replace("x", "×"));
  if (s.seed) parts.push(`seed ${s.seed}`);
  if (s.steps) parts.push(`${s.steps} steps`);
  if (s.strength) parts.push(`strength ${s.strength}`);
  if (s.images) parts.push(`edit of ${s.images}`);
  return parts.join(" · ");
}

function showOnStage(item, scroll) {
  state.shown = item;
  $("stage").classList.remove("empty");
  $("stage-img").src = item.url;
  $("stage-info").hidden = false;
  $("stage-prompt").textContent = item.settings.prompt || item.name;
  $("stage-meta").textContent = settingsLine(item.settings) + (item.settings.negative_prompt ? ` · not: ${item.settings.negative_prompt}` : "");
  $("stage-download").href = `${item.url}?download=1`;
  $("stage-download").download = item.name;
  $("stage-open").href = item.url;
  if (scroll) window.scrollTo({ top: 0, behavior: "smooth" });
}

function reuse(s) {
  if (!s) return;
  if (s.prompt !== undefined) $("prompt").value = s.prompt;
  const [w, h] = parseSize(s.size);
  if (w && h) setSize(w, h);
  updateSizeButtons();
  if (s.seed !== undefined) { $("seed").value = s.seed; setSeedMode("fixed"); }
  $("steps").value = s.steps || "";
  if (s.guidance && !$("base-options").hidden) $("guidance").value = s.guidance;
  $("negative").value = s.negative_prompt || "";
  if (s.strength) { $("strength").value = s.strength; updateStrength(); }
  save();
}

// ---- reference images -----------------------------------------------------------------------

function addRefs(files) {
  for (const file of files) {
    if (!/^image\/(png|jpeg|webp)$/.test(file.type)) { toast(`${file.name}: use PNG, JPEG or WebP.`); continue; }
    if (state.refs.length >= 8) { toast("At most 8 reference images."); break; }
    state.refs.push({ file, url: URL.createObjectURL(file) });
  }
  renderRefs();
}

function renderRefs() {
  const box = $("refs");
  box.replaceChildren(...state.refs.map((r, i) => {
    const el = document.createElement("div");
    el.className = "ref";
    const img = document.createElement("img");
    img.src = r.url;
    img.alt = r.file.name;
    img.title = r.file.name;
    const x = document.createElement("button");
    x.type = "button";
    x.textContent = "×";
    x.title = "Remove";
    x.onclick = (e) => { e.stopPropagation(); URL.revokeObjectURL(r.url); state.refs.splice(i, 1); renderRefs(); };
    el.append(img, x);
    return el;
  }));
  $("strength-row").hidden = state.refs.length !== 1;
  if (state.refs.length && state.size.mode === "preset" && !$("dropzone").dataset.sized) {
    state.size.mode = "auto";
    $("dropzone").dataset.sized = "1";
  }
  updateSizeButtons();
}

function updateStrength() {
  $("strength").disabled = !$("img2img").checked;
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

// ---- misc -----------------------------------------------------------------------------------

let toastTimer = null;
function toast(message, kind = "error") {
  const el = $("toast");
  el.textContent = message;
  el.className = "toast" + (kind === "info" ? " info" : "");
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

function save() {
  const data = {
    prompt: $("prompt").value, size: state.size, seedMode: state.seedMode, seed: $("seed").value,
    steps: $("steps").value, count: $("count").value, guidance: $("guidance").value, negative: $("negative").value,
  };
  try { localStorage.setItem(STORE, JSON.stringify(data)); } catch (e) { /* private mode */ }
}

function restore() {
  let data;
  try { data = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { data = null; }
  if (!data) return;
  $("prompt").value = data.prompt || "";
  if (data.size && data.size.mode !== "auto") {
    state.size = data.size;
    $("width").value = data.size.w;
    $("height").value = data.size.h;
  }
  $("seed").value = data.seed || "";
  $("steps").value = data.steps || "";
  $("count").value = data.count || "1";
  $("guidance").value = data.guidance || "";
  $("negative").value = data.negative || "";
  setSeedMode(data.seedMode || "random");
}

function wire() {
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); generate(); }
  });
  $("prompt").addEventListener("input", save);
  $("variations").onclick = () => generate({ variations: true });
  $("cancel").onclick = cancel;
  for (const b of $("seed-mode").children) b.onclick = () => setSeedMode(b.dataset.mode);
  for (const id of ["width", "height"]) {
    $(id).addEventListener("change", () => {
      const value = Number($(id).value);
      if ($(id).value === "" || !Number.isFinite(value)) return;
      $(id).value = Math.max(16, Math.min(4096, Math.round(value / 16) * 16));
      state.size = { w: Number($("width").value), h: Number($("height").value), mode: "custom" };
      save();
    });
  }
  for (const id of ["seed", "steps", "count", "guidance", "negative"]) $(id).addEventListener("change", save);
  $("seed").addEventListener("input", () => { if (state.seedMode === "random" && $("seed").value) setSeedMode("fixed"); });
  $("img2img").onchange = updateStrength;
  $("strength").oninput = updateStrength;
  $("stage-reuse").onclick = () => state.shown && reuse(state.shown.settings);
  const zone = $("dropzone");
  zone.onclick = () => $("ref-input").click();
  zone.onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("ref-input").click(); } };
  $("ref-input").onchange = (e) => { addRefs(e.target.files); e.target.value = ""; };
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); addRefs(e.dataTransfer.files); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.job) cancel(); });
}

buildSizePresets();
restore();
updateSizeButtons();
wire();
refreshHealth();
loadGallery();
setInterval(refreshHealth, 5000);
