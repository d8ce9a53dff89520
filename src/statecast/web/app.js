// The statecast dashboard: a live replica of the server's state, over /ws.
// It behaves like statecast.Replica (docs/client.md): sync with live, apply changes in
// seq order, reconnect with backoff and jitter, resume with subscribe-from under the
// same epoch, and fall back to a full sync on resync_required or a gap. Plain
// JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const MAX_ROWS = 2000;          // rows drawn per table (the rest are counted)
const PREFERRED = ["quotes", "orders", "executions", "positions"];
const PING_AFTER = 15000;       // ms of silence before we ping the server
const DEAD_AFTER = 45000;       // ms of silence after which the connection is dead (§4.3)
const TOKEN_KEY = "statecast.token";
const AUTH_CODES = ["unauthorized", "token_expired"];

const replica = {
  data: new Map(),              // collection -> Map(key -> {value, seq})
  seq: -1,                      // last applied seq; -1 before the first sync
  epoch: null,
  pending: null,                // Map being filled by a snapshot in progress
  beginEpoch: null,
  total: null,
  received: 0,
};
const view = { tables: new Map(), active: null, dirty: new Set(), flashes: new Map() };
const el = (id) => document.getElementById(id);

// What the page did, for people and for tests: full syncs and resumes completed, and
// how the last (re)connection joined the stream ("synced" or "resumed"). Mirrored on
// <body data-syncs data-resumes data-last-join>.
const stats = { syncs: 0, resumes: 0, lastJoin: null, sub: null };
window.statecast = stats;

let ws = null;                  // the current socket; events of any other are ignored
let attempt = 0;                // reconnections since the last successful join
let retryTimer = null;
let lastFrame = 0;              // performance.now() of the last message received
let lastPing = 0;
let awaitingToken = false;      // an auth error came: wait for the user, do not reconnect
let changeTimes = [];

// -- connection --------------------------------------------------------------------
function wsUrl() {
  // Next to the page (so it also works behind a proxy under a path), ws: or wss: as
  // the page is http: or https:.
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (awaitingToken || ws) return;
  setConn("connecting", "connecting…");
  let sock;
  try {
    sock = new WebSocket(wsUrl());
  } catch (exc) {                                   // a URL the browser refuses outright
    scheduleReconnect("cannot connect: " + exc.message);
    return;
  }
  ws = sock;
  sock.onopen = () => {
    if (sock !== ws) { sock.close(); return; }    // dropped while it was connecting
    lastFrame = lastPing = performance.now();
    // Requests are answered in order (§5.4): the token, when we have one, goes first,
    // and the sync or resume right behind it.
    const token = tokenStore.get();
    if (token) send({ op: "auth", token, id: "auth" });
    if (replica.seq >= 0 && replica.epoch) {
      send({ op: "subscribe", from: replica.seq, epoch: replica.epoch, id: "resume" });
      setConn("connecting", "resuming at seq " + replica.seq.toLocaleString() + "…");
    } else {
      fullSync();
    }
  };
  sock.onmessage = (event) => {
    if (sock === ws) receive(sock, event.data);
  };
  sock.onclose = () => {
    if (sock === ws) { ws = null; scheduleReconnect("disconnected"); }
  };
}

// Forget the current socket (its events are ignored from now on) and close it.
function closeSocket() {
  const sock = ws;
  ws = null;
  if (!sock) return;
  // Closing a socket that is still connecting makes the browser log an error; its
  // onopen closes it instead (sock !== ws).
  if (sock.readyState === WebSocket.OPEN) sock.close(1000);
}

function drop(reason) {
  closeSocket();
  scheduleReconnect(reason);
}

function scheduleReconnect(reason) {
  clearTimeout(retryTimer);
  retryTimer = null;
  replica.pending = null;                           // a snapshot cut short is worthless
  hideProgress();
  if (awaitingToken) {
    setConn("down", "waiting for an access token");
    return;
  }
  const delay = Math.min(10, 0.25 * 2 ** attempt) * (0.5 + Math.random());
  attempt += 1;
  setConn("down", reason + " · reconnecting in " + delay.toFixed(1) + "s");
  retryTimer = setTimeout(connect, delay * 1000);
}

function send(request) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(request));
}

function fullSync() {
  send({ op: "sync", live: true, id: "sync" });
  setConn("connecting", "syncing…");
}

// -- protocol ----------------------------------------------------------------------
function receive(sock, data) {
  lastFrame = performance.now();
  if (typeof data !== "string") { drop("unexpected binary message"); return; }
  for (const line of data.split("\n")) {        // one message, several frames (§10)
    if (!line) continue;
    let frame;
    try {
      frame = JSON.parse(line);
    } catch (exc) {
      drop("unreadable frame from the server");
      return;
    }
    handle(frame);
    if (sock !== ws) return;                    // that frame ended the connection
  }
}

function handle(f) {
  switch (f.type) {
    case "hello":
    case "heartbeat":
    case "pong":
      break;
    case "authed":
      stats.sub = f.sub ?? null;
      el("sub").textContent = stats.sub ?? "–";
      el("who").hidden = false;
      break;
    case "snapshot_begin":
      replica.pending = new Map();
      replica.total = f.count ?? null;
      replica.received = 0;
      replica.beginEpoch = f.epoch;
      showProgress();
      break;
    case "record": {
      if (!replica.pending) break;              // not ours: we never sync twice at once
      let coll = replica.pending.get(f.collection);
      if (!coll) replica.pending.set(f.collection, (coll = new Map()));
      coll.set(f.key, { value: f.value, seq: f.seq });
      replica.received += 1;
      if ((replica.received & 255) === 0) showProgress();
      break;
    }
    case "snapshot_end":
      if (!replica.pending) break;
      // The new contents replace the old at once.
      replica.data = replica.pending;
      replica.pending = null;
      replica.seq = f.seq;
      replica.epoch = replica.beginEpoch;
      hideProgress();
      rebuildAll();
      joined("synced", "live · synced " + (f.count ?? 0).toLocaleString() + " records");
      break;
    case "subscribed":
      joined("resumed", "live · resumed at seq " + f.seq.toLocaleString());
      break;
    case "change":
      apply(f);
      break;
    case "error":
      onError(f);
      break;
    case "bye":
      // The server is going away (§8): it will not be back within a few ms, so the
      // first attempt waits a little longer than after a mere drop.
      attempt = Math.max(attempt, 2);
      setConn("down", "server is restarting");
      break;
  }
}

function joined(how, text) {
  attempt = 0;
  if (how === "synced") stats.syncs += 1;
  else stats.resumes += 1;
  stats.lastJoin = how;
  document.body.dataset.syncs = stats.syncs;
  document.body.dataset.resumes = stats.resumes;
  document.body.dataset.lastJoin = how;
  clearNotice();
  setConn("live", text);
}

function onError(f) {
  const text = f.code + ": " + (f.message ?? "");
  if (f.code === "resync_required") {
    // Our history is gone (another epoch, or past what the server retains): start
    // over on this connection; the failed subscribe does not count (§3.2).
    replica.seq = -1;
    fullSync();
  } else if (AUTH_CODES.includes(f.code)) {
    askForToken(text);
  } else if (f.code === "forbidden") {
    showNotice(text, true);
    if (f.id === "sync" || f.id === "resume") setConn("down", text);
  } else {
    // Errors that close the connection (slow_consumer, too_large) are followed by
    // the close, which reconnects; the others leave it usable.
    showNotice(text, false);
    if (f.id === "sync" || f.id === "resume") setConn("down", text);
  }
}

function apply(f) {
  if (f.seq <= replica.seq) return;                 // never apply twice
  if (f.seq !== replica.seq + 1) {                  // a gap: only a full sync repairs it
    replica.seq = -1;
    // This connection is subscribed already and can have only one subscription
    // (§3.2): reconnect, and the new connection syncs.
    drop("missed changes, syncing again");
    return;
  }
  replica.seq = f.seq;
  let coll = replica.data.get(f.collection);
  if (!coll) replica.data.set(f.collection, (coll = new Map()));
  const id = f.collection + "\u0000" + f.key;
  if (f.deleted) {
    coll.delete(f.key);
    view.flashes.delete(id);
  } else {
    coll.set(f.key, { value: f.value, seq: f.seq });
    view.flashes.set(id, true);
    const t = view.tables.get(f.collection);
    if (t) addColumns(t, f.value);
  }
  changeTimes.push(performance.now());
  markDirty(f.collection);
}

// -- access token ------------------------------------------------------------------
// Kept in sessionStorage only (this tab, until it closes): never localStorage, never
// the URL. Where sessionStorage is refused, in this page's memory.
const tokenStore = {
  memory: null,
  get() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (exc) { return this.memory; }
  },
  set(token) {
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (exc) { this.memory = token; }
  },
  clear() {
    this.memory = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (exc) { /* nothing kept there */ }
  },
};

function askForToken(reason) {
  tokenStore.clear();                               // the one we sent, if any, is refused
  stats.sub = null;
  el("who").hidden = true;
  awaitingToken = true;
  closeSocket();
  scheduleReconnect(reason);                        // which waits for the token
  el("auth-reason").textContent = reason;
  el("auth").hidden = false;
  el("auth-token").focus();
}

el("auth").addEventListener("submit", (event) => {
  event.preventDefault();                           // the input has no name either
  const input = el("auth-token");
  const token = input.value.trim();
  if (!token) return;
  input.value = "";
  tokenStore.set(token);
  el("auth").hidden = true;
  awaitingToken = false;
  attempt = 0;
  closeSocket();
  connect();
});

// -- rendering ---------------------------------------------------------------------
function markDirty(name) {
  if (!view.dirty.size) requestAnimationFrame(render);
  view.dirty.add(name);
}

function rebuildAll() {
  for (const name of replica.data.keys()) markDirty(name);
  for (const name of view.tables.keys()) if (!replica.data.has(name)) markDirty(name);
  if (!replica.data.size) render();
}

function order(names) {
  return [...names].sort((a, b) => {
    const ia = PREFERRED.indexOf(a), ib = PREFERRED.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
}

function tableFor(name) {
  let t = view.tables.get(name);
  if (t) return t;
  const section = document.createElement("section");
  section.id = "table-" + name;
  section.dataset.collection = name;
  const note = document.createElement("div");
  note.className = "note";
  const table = document.createElement("table");
  const thead = table.createTHead();
  const tbody = table.createTBody();
  section.append(note, table);
  const tab = document.createElement("button");
  tab.type = "button";
  tab.dataset.collection = name;
  tab.onclick = () => activate(name);
  t = { name, section, note, thead, tbody, tab, columns: [], seen: new Set(), sortBy: null, desc: false };
  view.tables.set(name, t);
  for (const n of order(view.tables.keys())) {
    el("tabs").append(view.tables.get(n).tab);
    el("tables").append(view.tables.get(n).section);
  }
  if (!view.active) activate(name);
  return t;
}

function activate(name) {
  view.active = name;
  for (const t of view.tables.values()) {
    t.section.classList.toggle("active", t.name === name);
    t.tab.classList.toggle("active", t.name === name);
  }
  markDirty(name);
}

function addColumns(t, value) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const k of Object.keys(value)) if (!t.seen.has(k)) { t.seen.add(k); t.columns.push(k); }
  } else if (!t.seen.has("value")) { t.seen.add("value"); t.columns.push("value"); }
}

function columnsOf(t, coll) {
  // The fields of a sample of the records; changed records add theirs (apply).
  let n = 0;
  for (const { value } of coll.values()) {
    addColumns(t, value);
    if (++n >= 50) break;
  }
  return t.columns;
}

function render() {
  const names = [...view.dirty];
  view.dirty.clear();
  el("empty").hidden = replica.data.size > 0 || view.tables.size > 0;
  for (const name of names) {
    const coll = replica.data.get(name) || new Map();
    const t = tableFor(name);
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = coll.size.toLocaleString();
    t.tab.replaceChildren(name, count);
    if (name !== view.active) continue;         // only the visible table is drawn
    drawTable(t, coll);
  }
  let records = 0;
  for (const coll of replica.data.values()) records += coll.size;
  el("records").textContent = records.toLocaleString();
  el("seq").textContent = replica.seq >= 0 ? replica.seq.toLocaleString() : "–";
  el("epoch").textContent = replica.epoch || "–";
}

function drawTable(t, coll) {
  const columns = columnsOf(t, coll);
  const head = document.createElement("tr");
  for (const c of ["key", ...columns]) {
    const th = document.createElement("th");
    th.textContent = c;
    if (t.sortBy === c) th.className = "sorted" + (t.desc ? " desc" : "");
    th.onclick = () => {
      t.desc = t.sortBy === c ? !t.desc : false;
      t.sortBy = c;
      markDirty(t.name);
    };
    head.append(th);
  }
  t.thead.replaceChildren(head);
  let rows = [...coll.entries()];
  if (t.sortBy) {
    const c = t.sortBy, dir = t.desc ? -1 : 1;
    const pick = (k, v) => (c === "key" ? k : c === "value" ? v.value : v.value?.[c]);
    rows.sort((a, b) => {
      const x = pick(a[0], a[1]), y = pick(b[0], b[1]);
      if (x === y) return 0;
      if (x === undefined || x === null) return 1;
      if (y === undefined || y === null) return -1;
      return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * dir;
    });
  }
  t.note.textContent = rows.length > MAX_ROWS
    ? "showing " + MAX_ROWS.toLocaleString() + " of " + rows.length.toLocaleString() + " records" : "";
  const body = document.createDocumentFragment();
  for (const [key, rec] of rows.slice(0, MAX_ROWS)) {
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    const id = t.name + "\u0000" + key;
    if (view.flashes.has(id)) { tr.className = "flash"; view.flashes.delete(id); }
    const k = document.createElement("td");
    k.className = "key";
    k.textContent = key;
    tr.append(k);
    const v = rec.value;
    const scalar = typeof v !== "object" || v === null || Array.isArray(v);
    for (const c of columns) {
      tr.append(cellFor(c, c === "value" && scalar ? v : scalar ? undefined : v[c]));
    }
    body.append(tr);
  }
  t.tbody.replaceChildren(body);
}

function cellFor(column, value) {
  const td = document.createElement("td");
  if (value === undefined || value === null) return td;
  if (typeof value === "number") {
    td.className = "num";
    const money = /px|price|cost|pnl|value|bid|ask|last|open/i.test(column);
    td.textContent = money ? value.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 4 })
      : /(^|_)ts$|_at$/.test(column) ? new Date(value).toLocaleTimeString() : value.toLocaleString();
    // Zero is neither: no class (classList.add("") throws).
    if (/pnl|change/i.test(column) && value !== 0) td.classList.add(value < 0 ? "neg" : "pos");
  } else if (typeof value === "object") {
    td.textContent = JSON.stringify(value);
  } else {
    // Values become text, and a class only through className (any string is valid
    // there); the stylesheet knows the sides and statuses the demo uses.
    td.textContent = String(value);
    if (column === "side") td.className = String(value);
    if (column === "status") td.className = "status-" + value;
  }
  return td;
}

// -- header ------------------------------------------------------------------------
function setConn(kind, text) {
  el("conn").className = "conn " + (kind === "live" ? "live" : kind === "down" ? "down" : "");
  el("conn-text").textContent = text;
  document.body.dataset.state = kind;
}

function showNotice(text, sticky) {
  el("notice-text").textContent = text;
  el("notice").dataset.sticky = sticky ? "1" : "";
  el("notice").hidden = false;
}

function clearNotice() {
  if (!el("notice").dataset.sticky) el("notice").hidden = true;
}

el("notice-close").addEventListener("click", () => { el("notice").hidden = true; });

function showProgress() {
  el("progress").hidden = false;
  const total = replica.total;
  el("progress-fill").style.width = total ? Math.min(100, (100 * replica.received) / total) + "%" : "0";
  el("progress-text").textContent = replica.received.toLocaleString() + (total !== null ? " / " + total.toLocaleString() : "") + " records";
}

function hideProgress() {
  el("progress").hidden = true;
}

setInterval(() => {
  const now = performance.now();
  changeTimes = changeTimes.filter((t) => now - t < 1000);
  el("rate").textContent = changeTimes.length.toLocaleString();
  // A connection that says nothing for long is dead (§4.3); heartbeats come only while
  // subscribed, so ask with a ping before giving up on it.
  if (ws && ws.readyState === WebSocket.OPEN) {
    if (now - lastFrame > DEAD_AFTER) drop("no answer from the server");
    else if (now - lastFrame > PING_AFTER && now - lastPing > PING_AFTER) {
      lastPing = now;
      send({ op: "ping", id: "ping" });
    }
  }
}, 250);

connect();
