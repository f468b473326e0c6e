// livelm chat page. Plain browser JavaScript, no build step: it talks only to the server
// that served it (the OpenAI routes, /v1/chat/template and the /v1/stream WebSocket).
//
// Live prefill: while the person types, the draft (the conversation as the chat template
// writes it, with the draft as the last user message) is sent into a /v1/stream session
// (debounced; `append` when the draft only grew, else `replace`, so the engine keeps the
// KV of the longest common prefix). Enter closes the user turn in the same session and
// asks for the reply there, so only the last few tokens are left to compute. The session
// stays open across the turns of a conversation: each turn prefills only what it adds.
// Without the WebSocket the page falls back to streamed /v1/chat/completions with the
// conversation's session_id (the server pins its KV between turns).
"use strict";

const STORE = { convs: "livelm.conversations", current: "livelm.current",
                settings: "livelm.settings", key: "livelm.apiKey" };
const DEFAULTS = { system: "", temperature: 0.7, top_p: 1, max_tokens: 512, seed: "", live: true };
const DEBOUNCE_MS = 120;          // a draft update at most this often while typing
const FILE_PIECE_CHARS = 1000;    // a dropped file goes in as pieces of this many characters
const FILE_MAX_PENDING = 4096;    // wait while this many input tokens wait for prefill
const FILE_MAX_BYTES = 4 * 1024 * 1024;
const SENTINEL = "\u2063livelm-draft-7f3a\u2063"; // stands for the draft in the template

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------ small state

const S = {
  key: localStorage.getItem(STORE.key) || "",
  settings: { ...DEFAULTS, ...readJSON(STORE.settings, {}) },
  convs: readJSON(STORE.convs, []),
  currentId: localStorage.getItem(STORE.current),
  model: null,
  maxModelLen: null,
  live: null,          // the LiveSession of the current conversation, when connected
  liveBrokenUntil: 0,  // after a failed WebSocket, plain chat until then (ms timestamp)
  busy: null,          // the reply in flight: {cancel(), msg}
  attachment: null,    // {name, text, streamed: bool}
  filing: false,       // a dropped file is being streamed in
  frameCache: null,    // {key, prefix, suffix}
  replyCounter: 0,
};

function readJSON(name, fallback) {
  try { const v = JSON.parse(localStorage.getItem(name)); return v ?? fallback; } catch { return fallback; }
}
function saveConvs() {
  localStorage.setItem(STORE.convs, JSON.stringify(S.convs));
  if (S.currentId) localStorage.setItem(STORE.current, S.currentId);
}
function newId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
function current() {
  let conv = S.convs.find((c) => c.id === S.currentId);
  if (!conv) {
    conv = { id: newId("chat-"), title: "New chat", messages: [], created: Date.now() };
    S.convs.unshift(conv);
    S.currentId = conv.id;
    saveConvs();
  }
  return conv;
}

// ------------------------------------------------------------------------ HTTP helpers

class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code || null; }
}

function authHeaders(extra) {
  const h = { ...(extra || {}) };
  if (S.key) h.Authorization = "Bearer " + S.key;
  return h;
}

async function errorFrom(resp) {
  const text = await resp.text();
  let message = text || resp.statusText;
  let code = null;
  try {
    const body = JSON.parse(text);
    if (body && body.error) { message = body.error.message || message; code = body.error.code || null; }
  } catch { /* not JSON: show the text as it came */ }
  const err = new ApiError(resp.status, message, code);
  err.retryAfter = resp.headers.get("Retry-After");
  return err;
}

async function api(path, { method = "GET", body, signal } = {}) {
  let resp;
  try {
    resp = await fetch(path, {
      method, signal,
      headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "cannot reach the server");
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

// What the person reads for a failed request.
function describe(err) {
  if (!(err instanceof ApiError)) return String(err && err.message || err);
  if (err.status === 0) return `The server at ${location.origin} is unreachable. Is livelm serve still running?`;
  if (err.status === 401) return `The server needs a valid API key (401): ${err.message}`;
  if (err.status === 503) {
    const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
    return `The server is overloaded (503): ${err.message}.${wait}`;
  }
  if (err.status >= 400 && err.status < 500) return `The server refused the request (${err.status}): ${err.message}`;
  return `The server failed (${err.status}): ${err.message}`;
}

function showBanner(text) { const b = $("banner"); b.textContent = text; b.hidden = !text; }

// ------------------------------------------------------------------------ rendering

let renderQueued = new Set();
function renderMarkdown(el, text) {
  const html = window.marked ? marked.parse(text, { gfm: true, breaks: true, async: false }) : null;
  if (html === null || !window.DOMPurify) { el.textContent = text; return; }
  el.innerHTML = DOMPurify.sanitize(html);
  if (window.hljs) el.querySelectorAll("pre code").forEach((b) => hljs.highlightElement(b));
}

function messageView(conv, msg, index) {
  const box = document.createElement("article");
  box.className = `msg ${msg.role}` + (msg.state === "error" ? " error" : "");
  box.dataset.role = msg.role;
  box.dataset.state = msg.state || "done";
  box.dataset.index = String(index);
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = msg.role === "user" ? "You" : (S.model || "Assistant");
  const body = document.createElement("div");
  body.className = "body";
  if (msg.role === "assistant" && msg.state !== "error") renderMarkdown(body, msg.content);
  else body.textContent = msg.content;
  box.append(who, body);
  const meta = document.createElement("div");
  meta.className = "meta";
  if (msg.role === "user" && !S.busy) {
    meta.append(button("Edit", `Edit and resend message ${index + 1}`, () => editMessage(conv, index)));
  }
  if (msg.role === "assistant") {
    const info = document.createElement("span");
    info.className = "info";
    info.textContent = msg.info || (msg.state === "streaming" ? "writing…" : "");
    meta.append(info);
    if (!S.busy && index === conv.messages.length - 1) {
      meta.append(button("Regenerate", "Regenerate the last reply", () => regenerate(conv)));
    }
  }
  box.append(meta);
  return box;
}

function button(label, aria, onClick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.setAttribute("aria-label", aria);
  b.className = "link-btn";
  b.addEventListener("click", onClick);
  return b;
}

function renderMessages() {
  const conv = current();
  const list = $("messages");
  list.replaceChildren(...conv.messages.map((m, i) => messageView(conv, m, i)));
  list.scrollTop = list.scrollHeight;
}

// Streaming: re-render only the reply being written, once per animation frame.
function renderReply(msg) {
  renderQueued.add(msg);
  requestAnimationFrame(() => {
    if (!renderQueued.has(msg)) return;
    renderQueued.delete(msg);
    const conv = current();
    const index = conv.messages.indexOf(msg);
    const el = $("messages").querySelector(`article[data-index="${index}"]`);
    if (!el) return renderMessages();
    const list = $("messages");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    el.replaceWith(messageView(conv, msg, index));
    if (atBottom) list.scrollTop = list.scrollHeight;
  });
}

function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren(...S.convs.map((c) => {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button"; open.className = "open-conv"; open.textContent = c.title || "New chat";
    open.setAttribute("aria-current", c.id === S.currentId ? "true" : "false");
    open.addEventListener("click", () => switchTo(c.id));
    const del = document.createElement("button");
    del.type = "button"; del.className = "delete-conv"; del.textContent = "✕";
    del.setAttribute("aria-label", `Delete conversation “${c.title || "New chat"}”`);
    del.addEventListener("click", () => deleteConv(c.id));
    li.append(open, del);
    return li;
  }));
}

function setBusy(busy) {
  S.busy = busy;
  $("stop").hidden = !busy;
  $("send").disabled = !!busy;
  renderMessages();
}

// The last reply's figures (the draft's live count is #prefill-now, set by onLiveState).
function setReadout(text, data) {
  const r = $("last-turn");
  r.textContent = text;
  for (const k of Object.keys(r.dataset)) delete r.dataset[k];
  Object.assign(r.dataset, data || {});
}

function setTransport() {
  const live = liveWanted();
  $("transport").textContent = live ? (S.live ? "live prefill: on" : "live prefill: ready")
    : (S.settings.live ? "live prefill: unavailable (plain chat)" : "live prefill: off");
}

// ------------------------------------------------------------------------ the model

async function loadModel() {
  try {
    const resp = await api("/v1/models");
    const card = (await resp.json()).data[0];
    S.model = card.id; S.maxModelLen = card.max_model_len;
    $("model").textContent = `${card.id} · ${card.max_model_len} tokens`;
    showBanner("");
    return true;
  } catch (err) {
    if (err.status === 401) { askKey(S.key ? "The API key was not accepted. Enter the server's key." : null); }
    else { showBanner(describe(err)); }
    $("model").textContent = "not connected";
    return false;
  }
}

function askKey(reason) {
  $("key-reason").textContent = reason || "This server needs an API key. It is kept in this browser only.";
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

// ------------------------------------------------------------------------ live session

class LiveSession {
  // One /v1/stream WebSocket: one input session of the engine, for one conversation.
  constructor(convId) {
    this.convId = convId;
    this.sent = null;        // the whole input text the session has been sent
    this.state = null;       // the last `state` event
    this.replies = new Map(); // id -> {onDelta, onDone, onError}
    this.waiters = [];
    this.turnStart = 0;      // num_computed_tokens when the current turn began
    this.closed = false;
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // Browsers cannot set headers on a WebSocket: the key goes in the query (docs/streaming_input.md).
    const query = S.key ? `?api_key=${encodeURIComponent(S.key)}` : "";
    return new Promise((resolve, reject) => {
      let opened = false;
      let ws;
      try { ws = new WebSocket(`${scheme}://${location.host}/v1/stream${query}`); }
      catch (exc) { reject(exc); return; }
      this.ws = ws;
      ws.onopen = () => ws.send(JSON.stringify({ type: "open" }));
      ws.onmessage = (m) => {
        const ev = JSON.parse(m.data);
        if (ev.type === "session") { opened = true; this.sessionId = ev.session_id; resolve(this); return; }
        this.dispatch(ev);
      };
      ws.onclose = () => {
        this.closed = true;
        if (!opened) { reject(new Error("the WebSocket was refused")); return; }
        for (const r of this.replies.values()) r.onError(new ApiError(0, "the connection to the server was lost"));
        this.replies.clear();
        if (S.live === this) { S.live = null; setTransport(); }
      };
    });
  }

  dispatch(ev) {
    if (ev.type === "state") {
      this.state = ev;
      const ready = this.waiters.filter((w) => w.test(ev));
      this.waiters = this.waiters.filter((w) => !ready.includes(w));
      ready.forEach((w) => w.resolve(ev));
      onLiveState(this);
      return;
    }
    const reply = ev.id !== undefined ? this.replies.get(ev.id) : null;
    if (ev.type === "delta" && reply) reply.onDelta(ev);
    else if (ev.type === "done" && reply) { this.replies.delete(ev.id); reply.onDone(ev); }
    else if (ev.type === "error") {
      const err = new ApiError(ev.status || 400, ev.message, ev.code);
      if (reply) { this.replies.delete(ev.id); reply.onError(err); }
      else if (this.replies.size === 1 && ev.code !== "pending_input_limit") {
        const [id, r] = [...this.replies.entries()][0];
        this.replies.delete(id); r.onError(err);
      } else showBanner(describe(err));
      if (ev.code === "session_closed") this.close();
    }
  }

  send(event) { this.ws.send(JSON.stringify(event)); }

  // Make the session's input `text`: an append when it only grew, else a replace.
  setText(text) {
    if (this.closed || text === this.sent) return;
    if (this.sent !== null && text.startsWith(this.sent)) {
      this.send({ type: "append", text: text.slice(this.sent.length) });
    } else {
      this.send({ type: "replace", text });
    }
    this.sent = text;
  }

  nextState(test, timeoutMs = 30000) {
    return new Promise((resolve) => {
      const w = { test, resolve };
      this.waiters.push(w);
      setTimeout(() => { this.waiters = this.waiters.filter((x) => x !== w); resolve(this.state); }, timeoutMs);
    });
  }

  generate(id, fields, handlers) {
    this.replies.set(id, handlers);
    this.send({ type: "generate", id, ...fields });
  }

  cancel(id) { if (!this.closed) this.send({ type: "cancel", id }); }

  close() {
    if (this.closed) return;
    this.closed = true;
    try { this.send({ type: "close" }); this.ws.close(); } catch { /* already gone */ }
  }
}

function liveWanted() { return !!S.settings.live && Date.now() >= S.liveBrokenUntil && "WebSocket" in window; }

async function ensureLive(conv) {
  if (!liveWanted()) return null;
  if (S.live && !S.live.closed && S.live.convId === conv.id) return S.live;
  if (S.live) { S.live.close(); S.live = null; }
  if (S.connecting && S.connecting.convId === conv.id) return S.connecting.promise;
  const session = new LiveSession(conv.id);
  const promise = session.connect().then((s) => {
    if (S.currentId !== conv.id) { s.close(); return null; }
    S.live = s; setTransport(); return s;
  }).catch(() => {
    // The WebSocket is unavailable (blocked by a proxy, refused): plain chat for a while.
    S.liveBrokenUntil = Date.now() + 30000;
    setTransport();
    return null;
  }).finally(() => { if (S.connecting && S.connecting.promise === promise) S.connecting = null; });
  S.connecting = { convId: conv.id, promise };
  return promise;
}

function templateMessages(conv) {
  const msgs = [];
  if (S.settings.system.trim()) msgs.push({ role: "system", content: S.settings.system.trim() });
  for (const m of conv.messages) {
    if (m.state === "error") continue;
    msgs.push({ role: m.role, content: m.content });
  }
  return msgs;
}

// The text the chat template puts before and after the draft (the last user message).
async function draftFrame(conv) {
  const history = templateMessages(conv);
  const key = JSON.stringify(history);
  if (S.frameCache && S.frameCache.key === key) return S.frameCache;
  const resp = await api("/v1/chat/template", {
    method: "POST", body: { messages: [...history, { role: "user", content: SENTINEL }] } });
  const prompt = (await resp.json()).prompt;
  const at = prompt.indexOf(SENTINEL);
  if (at < 0 || prompt.indexOf(SENTINEL, at + 1) >= 0) return null; // the template rewrote it
  S.frameCache = { key, prefix: prompt.slice(0, at), suffix: prompt.slice(at + SENTINEL.length) };
  return S.frameCache;
}

function draftContent() {
  const typed = $("composer").value.trim();
  const file = S.attachment ? S.attachment.text : "";
  return [file, typed].filter(Boolean).join("\n\n");
}

// At most one draft update per DEBOUNCE_MS while typing (the first keystroke goes at
// once), and never two at the same time: a change made during one is sent after it.
let syncTimer = null;
let lastSync = 0;
let syncing = false;
let syncAgain = false;
function scheduleDraftSync() {
  if (syncTimer) return;
  const wait = Math.max(0, lastSync + DEBOUNCE_MS - performance.now());
  syncTimer = setTimeout(() => { syncTimer = null; lastSync = performance.now(); syncDraft(); }, wait);
}

async function syncDraft() {
  if (syncing) { syncAgain = true; return; }
  syncing = true;
  try {
    if (S.busy || S.filing || !liveWanted()) return;
    const conv = current();
    const live = await ensureLive(conv);
    if (!live || S.busy || S.filing || live.convId !== S.currentId) return;
    const frame = await draftFrame(conv);
    if (!frame || S.busy || S.filing) return;
    live.setText(frame.prefix + draftContent());
  } catch (err) {
    if (err.status === 401) askKey(); // otherwise the send will say what is wrong
  } finally {
    syncing = false;
    if (syncAgain) { syncAgain = false; syncDraft(); }
  }
}

function onLiveState(live) {
  if (S.busy || live !== S.live || !live.state) return;
  const done = Math.max(0, live.state.num_computed_tokens - live.turnStart);
  const pending = live.state.num_input_tokens - live.state.num_computed_tokens;
  const el = $("prefill-now");
  el.textContent = `Draft prefilled: ${done} tokens` + (pending > 0 ? ` (${pending} to go)` : "") + ".";
  el.dataset.prefilled = String(done);
}

// ------------------------------------------------------------------------ sending

function samplingFields() {
  const s = S.settings;
  const f = { temperature: Number(s.temperature), top_p: Number(s.top_p), max_tokens: Number(s.max_tokens) };
  if (s.seed !== "" && s.seed !== null && s.seed !== undefined) f.seed = Number(s.seed);
  return f;
}

async function send(content) {
  const t0 = performance.now();
  if (S.busy || S.filing) return;
  const fromComposer = content === undefined; // Regenerate resends; it keeps the draft
  content = (content ?? draftContent()).trim();
  if (!content) return;
  if (!S.model && !(await loadModel())) return;
  const conv = current();
  showBanner("");
  let live = S.live && !S.live.closed && S.live.convId === conv.id ? S.live : null;
  let frame = null;
  if (liveWanted()) {
    try {
      if (!live) live = await ensureLive(conv);
      if (live) frame = await draftFrame(conv);
    } catch (err) {
      if (err.status === 401) { askKey(); return; }
      frame = null;
    }
  }
  if (conv.messages.length === 0) conv.title = content.slice(0, 48);
  const user = { role: "user", content };
  const reply = { role: "assistant", content: "", state: "streaming" };
  conv.messages.push(user, reply);
  saveConvs();
  if (fromComposer) { $("composer").value = ""; clearAttachment(); }
  renderConversations();
  if (live && frame) await liveReply(conv, live, frame, content, reply, t0);
  else await plainReply(conv, reply, t0);
}

function finishReply(conv, reply, state, info) {
  reply.state = state;
  reply.info = info;
  saveConvs();
  setBusy(null);
  S.frameCache = null;
  // Prefill what this turn added (the reply, the next user header) while the person reads.
  syncDraft();
}

function liveReply(conv, live, frame, content, reply, t0) {
  return new Promise((resolve) => {
    const id = `r${++S.replyCounter}`;
    const typed = Math.max(0, (live.state ? live.state.num_computed_tokens : 0) - live.turnStart);
    let ttft = null;
    live.setText(frame.prefix + content + frame.suffix); // closes the user turn in the session
    $("prefill-now").textContent = "";
    live.generate(id, samplingFields(), {
      onDelta(ev) {
        if (ttft === null && (ev.text || (ev.token_ids && ev.token_ids.length))) {
          ttft = performance.now() - t0;
          setReadout(`Prefilled while typing: ${typed} tokens · first token ${Math.round(ttft)} ms after Enter`,
                     { prefilled: String(typed), ttftMs: String(Math.round(ttft)), mode: "live" });
        }
        reply.content += ev.text;
        renderReply(reply);
      },
      onDone(ev) {
        live.turnStart = live.state ? live.state.num_computed_tokens : 0;
        const usage = ev.usage || {};
        const stopped = ev.finish_reason === "abort";
        const info = `${stopped ? "stopped · " : ""}${usage.completion_tokens ?? "?"} tokens · prompt ${usage.prompt_tokens ?? "?"}, ${typed} prefilled while typing`;
        setReadout(`Prefilled while typing: ${typed} of ${usage.prompt_tokens ?? "?"} prompt tokens · first token ${ttft === null ? "–" : Math.round(ttft) + " ms"} after Enter`,
                   { prefilled: String(typed), ttftMs: ttft === null ? "" : String(Math.round(ttft)),
                     promptTokens: String(usage.prompt_tokens ?? ""), mode: "live", finish: ev.finish_reason });
        finishReply(conv, reply, stopped ? "stopped" : "done", info);
        resolve();
      },
      onError(err) {
        failReply(conv, reply, err);
        resolve();
      },
    });
    setBusy({ msg: reply, cancel: () => live.cancel(id) });
  });
}

function failReply(conv, reply, err) {
  const text = describe(err);
  if (reply.content) { reply.state = "stopped"; reply.info = text; }
  else { reply.state = "error"; reply.content = text; }
  showBanner(text);
  setReadout("", {});
  saveConvs();
  setBusy(null);
  S.frameCache = null;
  if (err.status === 401) askKey("The API key was not accepted. Enter the server's key.");
}

async function plainReply(conv, reply, t0) {
  const ctrl = new AbortController();
  let stopped = false;
  setBusy({ msg: reply, cancel: () => { stopped = true; ctrl.abort(); } });
  let ttft = null;
  let usage = {};
  let finish = null;
  try {
    const history = templateMessages(conv).slice(0, -1); // without the empty reply
    const resp = await api("/v1/chat/completions", {
      method: "POST", signal: ctrl.signal,
      body: { model: S.model, messages: history, stream: true, stream_options: { include_usage: true },
              session_id: conv.id, ...samplingFields() },
    });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new ApiError(chunk.error.code === "server_shutdown" ? 503 : 500, chunk.error.message, chunk.error.code);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (ttft === null) {
            ttft = performance.now() - t0;
            setReadout(`Plain chat · first token ${Math.round(ttft)} ms after Enter`,
                       { ttftMs: String(Math.round(ttft)), mode: "plain" });
          }
          reply.content += text;
          renderReply(reply);
        }
      }
    }
  } catch (err) {
    if (!stopped) { failReply(conv, reply, err); return; }
  }
  const info = `${stopped ? "stopped · " : ""}${usage.completion_tokens ?? "?"} tokens · prompt ${usage.prompt_tokens ?? "?"} (plain chat)`;
  setReadout(`Plain chat · first token ${ttft === null ? "–" : Math.round(ttft) + " ms"} after Enter`,
             { ttftMs: ttft === null ? "" : String(Math.round(ttft)), mode: "plain",
               finish: stopped ? "abort" : (finish || "") });
  finishReply(conv, reply, stopped ? "stopped" : "done", info);
}

function stop() { if (S.busy) S.busy.cancel(); }

function regenerate(conv) {
  if (S.busy) return;
  const last = conv.messages[conv.messages.length - 1];
  if (!last || last.role !== "assistant") return;
  conv.messages.pop();
  const user = conv.messages.pop();
  if (!user) return;
  S.frameCache = null;
  send(user.content);
}

function editMessage(conv, index) {
  if (S.busy) return;
  const msg = conv.messages[index];
  conv.messages.splice(index);
  saveConvs();
  S.frameCache = null;
  renderMessages();
  $("composer").value = msg.content;
  $("composer").focus();
  scheduleDraftSync();
}

// ------------------------------------------------------------------------ conversations

function switchTo(id) {
  if (S.busy) stop();
  if (S.live) { S.live.close(); S.live = null; }
  S.currentId = id; S.frameCache = null;
  clearAttachment();
  saveConvs();
  renderConversations(); renderMessages(); setReadout("", {}); setTransport();
  $("prefill-now").textContent = "";
  $("sidebar").classList.remove("open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
  $("composer").focus();
}

function newChat() {
  const conv = { id: newId("chat-"), title: "New chat", messages: [], created: Date.now() };
  S.convs.unshift(conv);
  switchTo(conv.id);
}

function deleteConv(id) {
  S.convs = S.convs.filter((c) => c.id !== id);
  if (S.currentId === id) { S.currentId = S.convs[0] ? S.convs[0].id : null; switchTo(current().id); }
  else { saveConvs(); renderConversations(); }
}

// ------------------------------------------------------------------------ a dropped file

function clearAttachment() {
  S.attachment = null;
  $("attachment").hidden = true;
}

async function attachFile(file) {
  if (!file) return;
  if (S.busy || S.filing) { showBanner("Wait for the reply to finish before adding a file."); return; }
  if (file.size > FILE_MAX_BYTES) { showBanner(`${file.name} is larger than ${FILE_MAX_BYTES / 1048576} MiB.`); return; }
  const text = (await file.text()).trim();
  S.attachment = { name: file.name, text, streamed: false };
  $("attachment").hidden = false;
  $("attachment-name").textContent = `${file.name} (${text.length.toLocaleString()} characters)`;
  const bar = $("file-progress");
  bar.max = Math.max(1, text.length); bar.value = 0;
  const conv = current();
  const live = await ensureLive(conv).catch(() => null);
  const frame = live ? await draftFrame(conv).catch(() => null) : null;
  if (!live || !frame) {
    $("file-status").textContent = "will be sent with the message (live prefill unavailable)";
    return;
  }
  // Stream the file in as appended pieces, keeping at most FILE_MAX_PENDING tokens waiting
  // for prefill (the server refuses more than --max-stream-pending-tokens).
  S.filing = true;
  try {
    live.setText(frame.prefix);
    for (let sent = 0; sent < text.length;) {
      if (S.attachment === null || live.closed) break;
      const next = Math.min(text.length, sent + FILE_PIECE_CHARS);
      live.setText(frame.prefix + text.slice(0, next));
      sent = next;
      bar.value = sent;
      const st = await live.nextState(() => true, 5000);
      if (st && st.num_input_tokens - st.num_computed_tokens > FILE_MAX_PENDING) {
        await live.nextState((s) => s.num_input_tokens - s.num_computed_tokens <= FILE_MAX_PENDING);
      }
      fileStatus(live, sent, text.length);
    }
    const st = await live.nextState((s) => s.num_computed_tokens >= s.num_input_tokens, 60000);
    if (S.attachment) {
      S.attachment.streamed = true;
      $("file-status").textContent = `streamed in: ${st ? st.num_computed_tokens.toLocaleString() : "?"} tokens prefilled. Ask about it.`;
      $("file-status").dataset.done = "true";
    }
  } finally {
    S.filing = false;
  }
  syncDraft();
}

function fileStatus(live, sent, total) {
  const st = live.state;
  $("file-status").textContent = `${Math.round(100 * sent / total)}% sent` +
    (st ? ` · ${st.num_computed_tokens.toLocaleString()} tokens prefilled` : "");
}

// ------------------------------------------------------------------------ settings

function openSettings() {
  const s = S.settings;
  $("set-system").value = s.system; $("set-temperature").value = s.temperature;
  $("set-top-p").value = s.top_p; $("set-max-tokens").value = s.max_tokens;
  $("set-seed").value = s.seed; $("set-live").checked = !!s.live; $("set-key").value = S.key;
  $("settings").showModal();
}

function saveSettings() {
  const num = (id, fallback) => { const v = $(id).value; return v === "" ? fallback : Number(v); };
  S.settings = {
    system: $("set-system").value,
    temperature: num("set-temperature", DEFAULTS.temperature),
    top_p: num("set-top-p", DEFAULTS.top_p),
    max_tokens: num("set-max-tokens", DEFAULTS.max_tokens),
    seed: $("set-seed").value,
    live: $("set-live").checked,
  };
  localStorage.setItem(STORE.settings, JSON.stringify(S.settings));
  setKey($("set-key").value.trim());
  S.frameCache = null; S.liveBrokenUntil = 0;
  if (!S.settings.live && S.live) { S.live.close(); S.live = null; }
  setTransport();
}

function setKey(key) {
  if (key === S.key) return;
  S.key = key;
  if (key) localStorage.setItem(STORE.key, key); else localStorage.removeItem(STORE.key);
  if (S.live) { S.live.close(); S.live = null; }
  S.liveBrokenUntil = 0;
  loadModel().then(setTransport);
}

// ------------------------------------------------------------------------ wiring

function init() {
  const composer = $("composer");
  composer.addEventListener("input", scheduleDraftSync);
  composer.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    else if (e.key === "Escape" && S.busy) { e.preventDefault(); stop(); }
  });
  $("composer-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("open-settings").addEventListener("click", openSettings);
  $("settings-cancel").addEventListener("click", () => $("settings").close());
  $("settings-form").addEventListener("submit", saveSettings);
  $("key-form").addEventListener("submit", () => setKey($("key-input").value.trim()));
  $("toggle-sidebar").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  $("file-input").addEventListener("change", (e) => { attachFile(e.target.files[0]); e.target.value = ""; });
  $("remove-attachment").addEventListener("click", () => { clearAttachment(); scheduleDraftSync(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && S.busy) stop(); });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop-hint").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop-hint").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault(); depth = 0; $("drop-hint").hidden = true;
    attachFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  current();
  renderConversations(); renderMessages(); setTransport();
  loadModel();
  composer.focus();
}

document.addEventListener("DOMContentLoaded", init);
