// worldplay live page: one WebSocket; JSON control messages, binary JPEG frames (see
// worldplay/serve/protocol.py). Frames are played at the model's 16 fps from a small queue; the
// page tells the server when each chunk starts playing (flow control), and times every key
// change to the first shown frame of the chunk that was generated with it.
"use strict";

const KEY_NAMES = {
  KeyW: "w", KeyA: "a", KeyS: "s", KeyD: "d",
  ArrowUp: "up", ArrowDown: "down", ArrowLeft: "left", ArrowRight: "right",
};
const HEADER_BYTES = 12; // world u32, chunk u32, frame u16, frames u16 (big-endian)
const LOOK_EVERY_MS = 50;

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => token ? `${path}?token=${encodeURIComponent(token)}` : path;

// What tests and curious people can read: window.worldplay.
const state = window.worldplay = {
  connected: false, world: 0, fps: 16, size: [64, 96], framesShown: 0, chunksShown: 0, lastChunk: -1,
  latenciesMs: [], stalls: 0, errors: [], held: [], seq: 0, started: false,
};

let ws = null;
let held = new Set();
let keyTimes = new Map(); // seq -> performance.now() of the change
let lookDx = 0, lookDy = 0;
let chunkInfo = new Map(); // "world/chunk" -> chunk message
let queue = []; // decoded frames waiting to be shown
let decoding = Promise.resolve();
let path = []; // [x, z, yaw] of every shown latent of this world
let shownTimes = [];
let uploaded = null; // {file, id}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
  if (isError) state.errors.push(text);
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${proto}//${location.host}${withToken("/ws")}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { state.connected = true; setStatus("connected"); };
  ws.onclose = (event) => {
    state.connected = false;
    $("start").disabled = $("reset").disabled = true;
    if (!state.errors.length) setStatus(`disconnected (${event.code}${event.reason ? ": " + event.reason : ""}); reload to play again`, true);
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
}

function onMessage(m) {
  switch (m.type) {
    case "hello": {
      state.size = m.size; state.fps = m.fps;
      const select = $("sample");
      select.replaceChildren(...m.samples.map((name) => new Option(name, name)));
      const screen = $("screen");
      [screen.height, screen.width] = m.size;
      screen.style.aspectRatio = `${m.size[1]} / ${m.size[0]}`;
      $("note").textContent = m.random_weights
        ? "Random weights: the frames are noise and the prompt has no effect; the controls, the stream and the map are real."
        : "";
      $("start").disabled = false;
      setStatus("choose an image and press Start");
      break;
    }
    case "started":
      state.world = m.world; state.started = true; state.lastChunk = -1;
      queue = []; path = []; chunkInfo.clear(); drawMinimap();
      $("reset").disabled = false;
      setStatus("playing: WASD move, arrows or mouse look");
      $("screen").focus();
      break;
    case "chunk":
      chunkInfo.set(`${m.world}/${m.chunk}`, m);
      break;
    case "full":
      setStatus(m.message);
      break;
    case "busy":
    case "error":
      setStatus(m.message, true);
      break;
  }
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const world = view.getUint32(0), chunk = view.getUint32(4), frame = view.getUint16(8), frames = view.getUint16(10);
  const blob = new Blob([buffer.slice(HEADER_BYTES)], { type: "image/jpeg" });
  // Decode in arrival order (createImageBitmap may finish out of order).
  decoding = decoding.then(() => createImageBitmap(blob)).then((bitmap) => {
    if (world === state.world) queue.push({ world, chunk, frame, frames, bitmap });
    else bitmap.close();
  }).catch((err) => setStatus(`a frame could not be decoded: ${err}`, true));
}

// -- playback at the model's frame rate --------------------------------------------------------

let nextTick = performance.now();
let starved = false;
function tick() {
  const now = performance.now();
  const period = 1000 / state.fps;
  if (now >= nextTick) {
    nextTick = Math.max(nextTick + period, now - period);
    const item = queue.shift();
    if (item) { show(item, now); starved = false; }
    else if (state.started && state.lastChunk >= 0 && !starved) { state.stalls += 1; starved = true; }
  }
  $("buffered").textContent = `${queue.length} frames`;
}

function show(item, now) {
  $("screen").getContext("2d").drawImage(item.bitmap, 0, 0);
  item.bitmap.close();
  state.framesShown += 1;
  shownTimes.push(now);
  while (shownTimes.length && shownTimes[0] < now - 2000) shownTimes.shift();
  if (shownTimes.length > 1) $("fps").textContent = (1000 * (shownTimes.length - 1) / (now - shownTimes[0])).toFixed(1);
  if (item.frame !== 0) return;
  // The first frame of a chunk: tell the server, time the key changes it answers, map it.
  state.lastChunk = item.chunk; state.chunksShown += 1;
  send({ type: "played", world: item.world, chunk: item.chunk });
  const info = chunkInfo.get(`${item.world}/${item.chunk}`);
  chunkInfo.delete(`${item.world}/${item.chunk}`);
  if (!info) return;
  for (const [seq, t] of keyTimes) {
    if (seq <= info.seq) {
      state.latenciesMs.push(now - t);
      keyTimes.delete(seq);
      $("latency").textContent = `${Math.round(now - t)} ms`;
    }
  }
  $("chunk").textContent = String(info.chunk);
  $("action").textContent = `${info.label} (${info.motion.translation} / ${info.motion.rotation})`;
  $("generate").textContent = `${Math.round(info.generate_ms)} ms`;
  path.push(...info.poses);
  drawMinimap();
}

function drawMinimap() {
  const canvas = $("minimap"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#2a313b";
  ctx.strokeRect(0.5, 0.5, w - 1, h - 1);
  if (!path.length) return;
  const xs = path.map((p) => p[0]), zs = path.map((p) => p[1]);
  const span = Math.max(0.5, Math.max(...xs) - Math.min(...xs), Math.max(...zs) - Math.min(...zs));
  const cx = (Math.max(...xs) + Math.min(...xs)) / 2, cz = (Math.max(...zs) + Math.min(...zs)) / 2;
  const scale = (Math.min(w, h) - 40) / span;
  const at = (p) => [w / 2 + (p[0] - cx) * scale, h / 2 - (p[1] - cz) * scale]; // +z forward is up
  ctx.strokeStyle = "#5fb3ff"; ctx.lineWidth = 2; ctx.beginPath();
  path.forEach((p, i) => { const [x, y] = at(p); if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y); });
  ctx.stroke();
  const last = path[path.length - 1], [x, y] = at(last), yaw = last[2];
  ctx.fillStyle = "#ffcf5f"; ctx.beginPath();
  ctx.moveTo(x + 10 * Math.sin(yaw), y - 10 * Math.cos(yaw));
  ctx.lineTo(x + 5 * Math.sin(yaw + 2.4), y - 5 * Math.cos(yaw + 2.4));
  ctx.lineTo(x + 5 * Math.sin(yaw - 2.4), y - 5 * Math.cos(yaw - 2.4));
  ctx.fill();
}

// -- controls ------------------------------------------------------------------------------------

function typing() {
  const el = document.activeElement;
  return el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.tagName === "SELECT");
}

function keysChanged() {
  state.seq += 1;
  state.held = [...held].sort();
  keyTimes.set(state.seq, performance.now());
  send({ type: "keys", down: state.held, seq: state.seq });
  document.querySelectorAll("#keys kbd").forEach((k) => k.classList.toggle("on", held.has(k.dataset.key)));
}

window.addEventListener("keydown", (e) => {
  if (typing()) return;
  if (e.code === "KeyR" && state.started && !e.repeat) { send({ type: "reset" }); return; }
  const name = KEY_NAMES[e.code];
  if (!name) return;
  e.preventDefault();
  if (!held.has(name)) { held.add(name); keysChanged(); }
});
window.addEventListener("keyup", (e) => {
  const name = KEY_NAMES[e.code];
  if (name && held.delete(name)) keysChanged();
});
window.addEventListener("blur", () => { if (held.size) { held.clear(); keysChanged(); } });

const screen = $("screen");
screen.addEventListener("click", () => { if (state.started && screen.requestPointerLock) screen.requestPointerLock(); });
document.addEventListener("mousemove", (e) => {
  if (document.pointerLockElement === screen) { lookDx += e.movementX; lookDy += e.movementY; }
});
setInterval(() => {
  if (!lookDx && !lookDy) return;
  state.seq += 1;
  keyTimes.set(state.seq, performance.now());
  send({ type: "look", dx: lookDx, dy: lookDy, seq: state.seq });
  lookDx = lookDy = 0;
}, LOOK_EVERY_MS);

async function uploadIfChosen() {
  const file = $("upload").files[0];
  if (!file) return null;
  if (uploaded && uploaded.file === file) return uploaded.id;
  setStatus("uploading…");
  const response = await fetch(withToken("/api/upload"), { method: "POST", body: file });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `upload failed (${response.status})`);
  uploaded = { file, id: body.upload };
  return body.upload;
}

$("start").addEventListener("click", async () => {
  try {
    const id = await uploadIfChosen();
    const image = id ? { upload: id } : { sample: $("sample").value };
    setStatus("starting the world…");
    send({ type: "start", image, prompt: $("prompt").value });
  } catch (err) {
    setStatus(String(err.message || err), true);
  }
});
$("reset").addEventListener("click", () => send({ type: "reset" }));

connect();
// A timer rather than requestAnimationFrame: the stream keeps its pace in a tab that is not painted.
setInterval(tick, 8);
