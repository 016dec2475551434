// DiffusionX page: one session per browser tab (its id lives in this tab's sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const dx = { sid: null, config: null, state: null, finalizing: false, maxStepSeen: 0, previewsSeen: 0 };
window.__dx = dx; // for the end-to-end tests and for curious people

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind === "ok" ? "ok" : "";
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, raw) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = raw ? body : JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, "the DiffusionX server cannot be reached (" + err.message + ")");
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? data.error : "HTTP " + response.status;
    throw new ApiError(response.status, message);
  }
  return data;
}

async function sessionCall(method, suffix, body, raw) {
  try {
    return await api(method, "/api/s/" + dx.sid + suffix, body, raw);
  } catch (err) {
    if (err.status === 404 && /no longer on the server/.test(err.message)) {
      await newSession();
      throw new ApiError(404, err.message + "; a new session was started");
    }
    throw err;
  }
}

async function newSession() {
  const state = await api("POST", "/api/session");
  dx.sid = state.id;
  sessionStorage.setItem("diffusionx-session", dx.sid);
  render(state);
}

// ----- progress while a long call runs --------------------------------------------------------
let pollTimer = null;
let lastPreviewStep = 0;

function startProgress(text) {
  $("progress-box").hidden = false;
  $("progress").removeAttribute("value");
  $("progress-text").textContent = text;
  $("progress-img").hidden = true;
  lastPreviewStep = 0;
  pollTimer = setInterval(pollProgress, 150);
  pollProgress();
}

function stopProgress() {
  clearInterval(pollTimer);
  pollTimer = null;
  $("progress-box").hidden = true;
}

async function waitWhileBusy() {
  startProgress("still working…");
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 500));
    let state;
    try { state = await api("GET", "/api/s/" + dx.sid); } catch (err) { break; }
    if (!state.busy) { render(state); break; }
  }
  stopProgress();
}

async function pollProgress() {
  let p;
  try { p = await api("GET", "/api/s/" + dx.sid + "/progress"); } catch (err) { return; }
  if (pollTimer === null || p.phase === "idle") return;
  const words = { waiting: "waiting", rendering: "rendering", finalizing: "cloud refining", replaying: "replaying" };
  let text = words[p.phase] || p.phase;
  if (p.total) {
    $("progress").max = p.total;
    $("progress").value = Math.min(p.step, p.total);
    text += " step " + p.step + " / " + p.total;
  } else if (p.step) {
    text += " step " + p.step;
  }
  dx.maxStepSeen = Math.max(dx.maxStepSeen, p.step);
  if (p.note) text += " — " + p.note;
  text += " (" + p.elapsed_s.toFixed(1) + " s)";
  $("progress-text").textContent = text;
  if (p.preview_step && p.preview_step !== lastPreviewStep) {
    lastPreviewStep = p.preview_step;
    const img = $("progress-img");
    img.onload = () => { img.hidden = false; dx.previewsSeen += 1; };
    img.src = "/api/s/" + dx.sid + "/progress.png?step=" + p.preview_step + "&t=" + Date.now();
  }
}

// ----- rendering the state ---------------------------------------------------------------------
const secs = (s) => (s >= 1 ? s.toFixed(2) + " s" : (s * 1000).toFixed(0) + " ms");
const kib = (b) => (b >= 1024 ? (b / 1024).toFixed(1) + " KiB" : b + " B");

function describeCost(r) {
  const t = r.timing;
  return "edge " + secs(r.edge_seconds) + " (text " + secs(t.text_encode_s) + ", U-Net " + secs(t.unet_s) +
    " for " + r.unet_steps + " of " + r.steps + " steps, decode " + secs(t.decode_s) + ")";
}

function render(state) {
  dx.state = state;
  if (document.activeElement !== $("seed")) $("seed").value = state.seed;
  if (document.activeElement !== $("steps")) $("steps").value = state.steps;
  if (state.policy) $("policy").value = state.policy;
  const rounds = state.rounds;
  const head = rounds.find((r) => r.index === state.head);
  // current preview: the head round
  if (head) {
    $("current-img").src = head.image;
    $("current-img").hidden = false;
    $("current-title").textContent = "round " + head.index;
    $("current-info").innerHTML = "";
    const lines = [
      ["prompt", head.prompt],
      ["made", head.how],
      ["mode", head.mode],
      ["seed", String(head.seed)],
      ["cost", describeCost(head)],
    ];
    for (const [k, v] of lines) {
      const div = document.createElement("div");
      div.className = "info-" + k;
      const b = document.createElement("span");
      b.className = "muted";
      b.textContent = k + ": ";
      div.append(b, document.createTextNode(v));
      $("current-info").append(div);
    }
  } else {
    $("current-img").hidden = true;
    $("current-title").textContent = "";
    $("current-info").textContent = "Type a prompt and press Generate.";
  }
  const last = rounds[rounds.length - 1];
  $("branch-note").textContent = head && last && head.index !== last.index
    ? "the next round branches from round " + head.index : "";
  // history
  const history = $("history");
  history.innerHTML = "";
  for (const r of rounds) {
    const item = document.createElement("button");
    item.type = "button";
    item.className = "round" + (r.index === state.head ? " head" : "");
    item.dataset.round = r.index;
    item.title = r.prompt + "\n" + r.how;
    const img = document.createElement("img");
    img.className = "pixel";
    img.src = r.image;
    img.alt = "round " + r.index;
    const label = document.createElement("span");
    label.className = "label";
    const how = r.mode === "fresh" ? "fresh" : r.mode + " s=" + r.strength.toFixed(2) + (r.parent ? " ←" + r.parent : "");
    label.textContent = "#" + r.index + " " + how + " · " + secs(r.edge_seconds);
    const save = document.createElement("a");
    save.className = "save";
    save.href = "/api/s/" + state.id + "/round/" + r.index + ".png?download=1";
    save.download = "diffusionx-round-" + String(r.index).padStart(2, "0") + ".png";
    save.title = "download round " + r.index + " (prompt, seed and steps in the PNG)";
    save.textContent = "⤓";
    save.addEventListener("click", (e) => e.stopPropagation());
    item.append(img, label, save);
    item.addEventListener("click", () => branch(r.index));
    history.append(item);
  }
  // final
  renderFinal(state.final);
  const ready = !!state.final;
  $("download-png").classList.toggle("disabled", !ready);
  $("download-png").href = ready ? "/api/s/" + state.id + "/final.png?download=1" : "#";
  $("download-json").classList.toggle("disabled", rounds.length === 0);
  $("download-json").href = rounds.length ? "/api/s/" + state.id + "/session.json" : "#";
  if (state.notes && state.notes.length) showMessage(state.notes.join("; "), "ok");
}

function renderFinal(f) {
  $("final").hidden = !f;
  $("cloud-down").hidden = !f || f.refined;
  if (!f) return;
  $("final-preview").src = f.preview_image;
  $("final-refined").src = f.image;
  $("refined-caption").textContent = f.refined ? "refined by the cloud" : "NOT refined: the edge preview, kept";
  if (!f.refined) {
    $("cloud-message").textContent = "The cloud could not be reached or did not answer, so your preview is kept as the final image. " +
      "(" + f.reason + ")";
  }
  const rows = [
    ["round", String(f.source_round)],
    ["edge time", secs(f.edge_seconds) + " over all rounds (" + secs(f.source_edge_seconds) + " this round)"],
    ["transfer", kib(f.bytes_up) + " up, " + kib(f.bytes_down) + " down" +
      (f.refined ? ", " + secs(f.transfer_s) + (dx.config.cloud === "in-process" ? " (in-process: no network)" : "")
        : " (not delivered)")],
    ["cloud queue", f.refined ? secs(f.cloud_queue_s) : "—"],
    ["cloud compute", f.refined ? secs(f.cloud_compute_s) + " (" + f.unet_steps + " U-Net steps)" : "—"],
    ["decode on the edge", f.refined ? secs(f.edge_decode_s) : "—"],
    ["strength", f.strength.toFixed(2) + " of " + f.steps + " steps"],
    ["Finalize took", secs(f.finalize_wall_s)],
  ];
  const table = $("final-stats");
  table.innerHTML = "";
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
}

// ----- actions -------------------------------------------------------------------------------
async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  showMessage("");
  const button = $("generate");
  button.disabled = true;
  startProgress("rendering…");
  try {
    const body = { prompt, policy: $("policy").value };
    const mode = $("mode").value;
    if (mode) body.mode = mode;
    for (const key of ["seed", "strength", "steps"]) {
      const text = $(key).value.trim();
      if (text !== "") body[key] = Number(text);
    }
    const state = await sessionCall("POST", "/generate", body);
    showMessage("");  // an error of an earlier action is over
    render(state);
  } catch (err) {
    showMessage(err.message);
  } finally {
    stopProgress();
    button.disabled = false;
  }
}

async function variation() {
  showMessage("");
  const button = $("variation");
  button.disabled = true;
  startProgress("rendering a variation…");
  try {
    const state = await sessionCall("POST", "/variation");
    showMessage("");
    render(state);
  } catch (err) {
    showMessage(err.message);
  } finally {
    stopProgress();
    button.disabled = false;
  }
}

async function branch(index) {
  showMessage("");
  try {
    render(await sessionCall("POST", "/back", { round: index }));  // #branch-note says what it means
  } catch (err) {
    showMessage(err.message);
  }
}

async function finalize() {
  showMessage("");
  const mine = !dx.finalizing;
  if (mine) {
    dx.finalizing = true;
    startProgress("sending to the cloud…");
  }
  try {
    const state = await sessionCall("POST", "/finalize", { policy: $("policy").value, mode: $("finalize-mode").value });
    if (mine) showMessage("");  // e.g. "a Finalize is already running" from a second press: it is done now
    render(state);
  } catch (err) {
    showMessage(err.message);
  } finally {
    if (mine) {
      dx.finalizing = false;
      stopProgress();
    }
  }
}

async function loadFile() {
  const file = $("load-file").files[0];
  if (!file) return;
  showMessage("");
  startProgress("loading…");
  try {
    const text = await file.text();
    render(await sessionCall("POST", "/load", text, true));
    if (!(dx.state.notes && dx.state.notes.length)) {
      showMessage("Loaded " + file.name + ": " + dx.state.rounds.length + " rounds replayed.", "ok");
    }
  } catch (err) {
    showMessage(err.message);
  } finally {
    stopProgress();
    $("load-file").value = "";
  }
}

function countChars() {
  const n = $("prompt").value.length;
  const limit = dx.config ? dx.config.max_prompt_chars : 0;
  $("count").textContent = limit ? "(" + n + " / " + limit + ")" : "";
  $("count").classList.toggle("over", limit > 0 && n > limit);
}

async function init() {
  $("prompt-form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("prompt-form").requestSubmit(); }
  });
  $("prompt").addEventListener("input", countChars);
  $("finalize").addEventListener("click", finalize);
  $("variation").addEventListener("click", variation);
  $("retry").addEventListener("click", finalize);
  $("load-file").addEventListener("change", loadFile);
  try {
    dx.config = await api("GET", "/api/config");
    $("models").textContent = "edge " + dx.config.edge_label + " · cloud " + dx.config.cloud_label +
      " · " + dx.config.steps + " steps";
    $("untrained").hidden = !dx.config.untrained;
    $("cloud-label").textContent = dx.config.cloud;
    const modeWords = {
      auto: "auto (from the word edit)", fresh: "fresh, from noise", sdedit: "SDEdit from the selected round",
      controlled: "attention-controlled (keeps the layout)",
      local: "local edit (keeps everything the edit does not touch)",
    };
    for (const m of dx.config.modes || []) {
      const option = document.createElement("option");
      option.value = m;
      option.textContent = modeWords[m] || m;
      $("mode").append(option);
    }
    $("mode-box").hidden = !(dx.config.modes && dx.config.modes.length);
    const policyWords = {
      fixed: "fixed strengths", learned: "learned (noise-level predictors)", "load-aware": "load-aware",
      "similarity-rule": "prompt-similarity rule",
    };
    for (const spec of dx.config.policies || ["fixed"]) {
      const option = document.createElement("option");
      option.value = spec;
      option.textContent = policyWords[spec] || spec;
      $("policy").append(option);
    }
    countChars();
    const saved = sessionStorage.getItem("diffusionx-session");
    if (saved) {
      try {
        dx.sid = saved;
        const state = await api("GET", "/api/s/" + saved);
        render(state);
        if (state.busy) waitWhileBusy(); // reloaded while a render ran: follow it to the end
      } catch (err) {
        await newSession();
      }
    } else {
      await newSession();
    }
    document.body.dataset.ready = "1";
  } catch (err) {
    showMessage(err.message);
  }
}

init();
