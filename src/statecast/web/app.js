// The statecast dashboard: a live replica of the server's state, over /ws.
// It behaves like statecast.Replica (docs/client.md): sync with live, apply changes in
// seq order, reconnect with backoff and jitter, resume with subscribe-from under the
// same epoch, and fall back to a full sync on resync_required or a gap. By default it
// asks for conflated changes (§3.9: the newest value of each key at most every 100 ms,
// the "updates" setting), so that a firehose costs it a few frames per key per second.
// Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const MAX_ROWS = 2000;          // rows drawn per table (the rest are counted)
const PREFERRED = ["quotes", "orders", "executions", "positions"];
const PING_AFTER = 15000;       // ms of silence before we ping the server
const DEAD_AFTER = 45000;       // ms of silence after which the connection is dead (§4.3)
const TOKEN_KEY = "statecast.token";
const CONFLATE_KEY = "statecast.conflate";
const CONFLATE_CHOICES = [0, 50, 100, 250, 1000];   // ms between updates of a key; 0: every change
const CONFLATE_DEFAULT = 100;
const AUTH_CODES = ["unauthorized", "token_expired"];

const replica = {
  data: new Map(),              // collection -> Map(key -> {value, seq})
  seq: -1,                      // last applied seq; -1 before the first sync
  epoch: null,
  pending: null,                // Map being filled by a snapshot in progress
  beginEpoch: null,
  total: null,
  received: 0,
  // How seqs must follow each other. Consecutive (§5.2) unless one of these holds, and
  // then they only increase: the server conflates what we asked (§3.9; the interval it
  // echoed, in seconds), it conflates us because we fell behind (§4.5, §7), the first
  // change after that ended (keys created and deleted meanwhile were never sent), or
  // the access token narrows what we see (§3.8).
  conflate: null,
  degraded: false,
  gapOk: false,
  filtered: false,
};
// dirty: collection -> the keys changed since it was last drawn (null: draw it all).
const view = { tables: new Map(), active: null, dirty: new Map() };
const el = (id) => document.getElementById(id);

// What the page did, for people and for tests: full syncs and resumes completed, and
// how the last (re)connection joined the stream ("synced" or "resumed"); change frames
// applied; the conflation interval the server confirmed (seconds, null: every change);
// and how often the server conflated the page because it fell behind (§4.5). Mirrored
// on <body data-syncs data-resumes data-last-join>.
const stats = {
  syncs: 0, resumes: 0, lastJoin: null, sub: null,
  changes: 0, conflate: null, catchUps: 0, seq: -1,
};
window.statecast = stats;

let ws = null;                  // the current socket; events of any other are ignored
let attempt = 0;                // reconnections since the last successful join
let retryTimer = null;
let lastFrame = 0;              // performance.now() of the last message received
let lastPing = 0;
let awaitingToken = false;      // an auth error came: wait for the user, do not reconnect
const rate = { buckets: [0, 0, 0, 0], i: 0 };   // changes applied per 250 ms, last second

// -- connection --------------------------------------------------------------------
// Nodes of a cluster (docs/cluster.md): ?nodes=host:port,host:port (their HTTP ports).
// The page uses one at a time and moves to the next when it loses it; the nodes share
// epoch and seqs, so it resumes there. Without it: the node that served the page.
const nodes = (new URLSearchParams(location.search).get("nodes") || "")
  .split(",").map((n) => n.trim()).filter((n) => n);
let node = 0;

function wsUrl() {
  // Next to the page (so it also works behind a proxy under a path), ws: or wss: as
  // the page is http: or https:.
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (nodes.length) {
    url.host = nodes[node % nodes.length];
    url.pathname = "/ws";
  }
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
  newLink();
  sock.onopen = () => {
    if (sock !== ws) { sock.close(); return; }    // dropped while it was connecting
    lastFrame = lastPing = performance.now();
    // Requests are answered in order (§5.4): the token, when we have one, goes first,
    // and the sync or resume right behind it.
    const token = tokenStore.get();
    if (token) send({ op: "auth", token, id: "auth" });
    if (replica.seq >= 0 && replica.epoch) {
      send({ op: "subscribe", from: replica.seq, epoch: replica.epoch, id: "resume", ...conflation() });
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

// What a connection learnt about its stream does not carry over to the next one.
function newLink() {
  replica.conflate = stats.conflate = null;
  replica.degraded = replica.gapOk = replica.filtered = false;
  el("catching-up").hidden = true;
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
  newLink();
  if (awaitingToken) {
    setConn("down", "waiting for an access token");
    return;
  }
  let delay = Math.min(10, 0.25 * 2 ** attempt) * (0.5 + Math.random());
  attempt += 1;
  if (nodes.length > 1) {                           // the next node, without waiting long
    node += 1;
    delay = Math.min(delay, 0.25 * nodes.length * (0.5 + Math.random()));
  }
  setConn("down", reason + " · reconnecting in " + delay.toFixed(1) + "s");
  retryTimer = setTimeout(connect, delay * 1000);
}

function send(request) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(request));
}

function fullSync() {
  send({ op: "sync", live: true, id: "sync", ...conflation() });
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
    case "pong":
      break;
    case "heartbeat":
      // Every change up to f.seq has been sent (§4.3). Just after the server stopped
      // conflating us, that is the seq our copy is at.
      if (replica.gapOk && replica.seq >= 0 && f.seq > replica.seq) {
        replica.seq = stats.seq = f.seq;
        replica.gapOk = false;
      }
      break;
    case "authed": {
      // A token that narrows what we read makes seqs skip (§3.8, §5.2).
      const where = f.where && typeof f.where === "object" && Object.keys(f.where).length > 0;
      replica.filtered = f.read !== "*" || where;
      stats.sub = f.sub ?? null;
      el("sub").textContent = stats.sub ?? "–";
      el("who").hidden = false;
      break;
    }
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
      replica.seq = stats.seq = f.seq;
      replica.epoch = replica.beginEpoch;
      confirmConflation(f);
      hideProgress();
      rebuildAll();
      joined("synced", "live · synced " + (f.count ?? 0).toLocaleString() + " records");
      break;
    case "subscribed":
      confirmConflation(f);
      joined("resumed", "live · resumed at seq " + f.seq.toLocaleString());
      break;
    case "change":
      apply(f);
      break;
    case "conflating":
      // §4.5: we fell behind, and until we have drained, the server sends the newest
      // value of each key only; seqs skip meanwhile, and once more right after.
      replica.degraded = f.on === true;
      if (replica.degraded) stats.catchUps += 1;
      else replica.gapOk = true;
      el("catching-up").hidden = !replica.degraded;
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

function confirmConflation(f) {
  replica.conflate = stats.conflate = typeof f.conflate === "number" ? f.conflate : null;
}

function apply(f) {
  if (f.seq <= replica.seq) return;                 // never apply twice
  const skips = replica.conflate !== null || replica.degraded || replica.gapOk || replica.filtered;
  if (f.seq !== replica.seq + 1 && !skips) {        // a gap: only a full sync repairs it
    replica.seq = -1;
    // This connection is subscribed already and can have only one subscription
    // (§3.2): reconnect, and the new connection syncs.
    drop("missed changes, syncing again");
    return;
  }
  replica.seq = stats.seq = f.seq;
  replica.gapOk = false;
  let coll = replica.data.get(f.collection);
  if (!coll) replica.data.set(f.collection, (coll = new Map()));
  if (f.deleted) {
    coll.delete(f.key);
  } else {
    coll.set(f.key, { value: f.value, seq: f.seq });
    const t = view.tables.get(f.collection);
    if (t) addColumns(t, f.value);
  }
  stats.changes += 1;
  rate.buckets[rate.i] += 1;
  // Only the visible table is drawn: the others just count (and are drawn whole when
  // shown), so keep no keys for them.
  markDirty(f.collection, f.collection === view.active ? f.key : null);
}

// -- settings kept for this tab ------------------------------------------------------
// In sessionStorage only (this tab, until it closes): never localStorage, never the
// URL. Where sessionStorage is refused, in this page's memory.
function tabStore(key) {
  return {
    memory: null,
    get() {
      try { return sessionStorage.getItem(key); } catch (exc) { return this.memory; }
    },
    set(value) {
      try { sessionStorage.setItem(key, value); } catch (exc) { this.memory = value; }
    },
    clear() {
      this.memory = null;
      try { sessionStorage.removeItem(key); } catch (exc) { /* nothing kept there */ }
    },
  };
}

// -- update interval (§3.9) ---------------------------------------------------------
const conflateStore = tabStore(CONFLATE_KEY);

function conflateMs() {
  const ms = Number(conflateStore.get() ?? CONFLATE_DEFAULT);
  return CONFLATE_CHOICES.includes(ms) ? ms : CONFLATE_DEFAULT;
}

// The fields a sync (live) or subscribe carries for the chosen interval.
function conflation() {
  const ms = conflateMs();
  return ms > 0 ? { conflate: ms / 1000 } : {};
}

el("conflate").value = String(conflateMs());
el("conflate").addEventListener("change", (event) => {
  const ms = Number(event.target.value);
  if (!CONFLATE_CHOICES.includes(ms) || ms === conflateMs()) return;
  conflateStore.set(String(ms));
  // A connection has one subscription, fixed when it is made (§3.2): reconnect, and
  // resume where we are at the new pace (or sync, if we never got that far).
  attempt = 0;
  replica.pending = null;
  hideProgress();
  closeSocket();
  connect();
});

// -- access token ------------------------------------------------------------------
const tokenStore = tabStore(TOKEN_KEY);

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
// At most once per animation frame, and only the visible table. A table whose rows
// only changed value, in place (no record added or removed, no column added, not
// sorted by a value), gets just the cells that changed rewritten; anything else redraws
// it whole (keeping the rows it had). A changed row flashes: a Web Animation on the row
// that fades in a few steps (repainted a few times, not every frame), and is not
// restarted while it runs, so that under a stream of changes (a firehose, conflated to
// one change per record per 100 ms) a row pulses about once a second instead of
// keeping the page repainting every frame.
const FLASH = { duration: 1200, easing: "steps(6)" };
let flashFrames = null;                             // read from the stylesheet once
const fmt = {                                       // Intl formatters are costly to make
  money: new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 4 }),
  number: new Intl.NumberFormat(),
  time: new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "numeric", second: "numeric" }),
};

// name: a collection; key: the key that changed, or undefined (or null): draw it whole
// (a table not shown is only counted until it is shown, and then drawn whole).
function markDirty(name, key) {
  if (!view.dirty.size) requestAnimationFrame(render);
  const keys = view.dirty.get(name);
  if (key === undefined || key === null) view.dirty.set(name, null);
  else if (keys === undefined) view.dirty.set(name, new Set([key]));
  else if (keys !== null) keys.add(key);
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
  t = {
    name, section, note, thead, tbody, tab, columns: [], seen: new Set(), sortBy: null, desc: false,
    rows: new Map(),                                // key -> its <tr>, for the rows drawn
    drawnColumns: -1,                               // how many columns the rows have
    drawnCount: -1,                                 // how many records there were
  };
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
  const dirty = [...view.dirty];
  view.dirty.clear();
  el("empty").hidden = replica.data.size > 0 || view.tables.size > 0;
  for (const [name, keys] of dirty) {
    const coll = replica.data.get(name) || new Map();
    const t = tableFor(name);
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = fmt.number.format(coll.size);
    t.tab.replaceChildren(name, count);
    if (name !== view.active) continue;         // only the visible table is drawn
    if (!keys || !patchTable(t, coll, keys)) drawTable(t, coll, keys);
  }
  let records = 0;
  for (const coll of replica.data.values()) records += coll.size;
  el("records").textContent = fmt.number.format(records);
  el("seq").textContent = replica.seq >= 0 ? fmt.number.format(replica.seq) : "–";
  el("epoch").textContent = replica.epoch || "–";
}

// Redraw the rows of `keys` in place; false when the table must be drawn whole.
function patchTable(t, coll, keys) {
  if (t.drawnColumns !== columnsOf(t, coll).length || t.drawnCount !== coll.size) return false;
  if (t.sortBy && t.sortBy !== "key") return false;   // a new value may move its row
  for (const key of keys) if (coll.has(key) !== t.rows.has(key)) return false;
  for (const key of keys) {
    const tr = t.rows.get(key);
    if (!tr) continue;                               // past MAX_ROWS, not drawn
    fillRow(t, tr, key, coll.get(key).value);
    flash(tr);
  }
  return true;
}

function drawTable(t, coll, flashed) {
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
    ? "showing " + fmt.number.format(MAX_ROWS) + " of " + fmt.number.format(rows.length) + " records" : "";
  const body = document.createDocumentFragment();
  const old = t.rows;
  t.rows = new Map();
  for (const [key, rec] of rows.slice(0, MAX_ROWS)) {
    // The row of a record drawn before is kept (and its flash goes on).
    let tr = old.get(key);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.key = key;
    }
    fillRow(t, tr, key, rec.value);
    if (flashed && flashed.has(key)) flash(tr);
    t.rows.set(key, tr);
    body.append(tr);
  }
  t.drawnColumns = columns.length;
  t.drawnCount = coll.size;
  t.tbody.replaceChildren(body);
}

// The cells of a row: the key, then one per column. The cells a row has are kept, and
// only a text or a class that differs is written (the rest of the table is untouched).
function fillRow(t, tr, key, v) {
  const columns = t.columns;
  while (tr.cells.length > columns.length + 1) tr.lastChild.remove();
  while (tr.cells.length < columns.length + 1) tr.append(document.createElement("td"));
  const cells = tr.cells;
  setCell(cells[0], key, "key");
  const scalar = typeof v !== "object" || v === null || Array.isArray(v);
  for (let i = 0; i < columns.length; i++) {
    const c = columns[i];
    const [text, className] = cellFor(c, c === "value" && scalar ? v : scalar ? undefined : v[c]);
    setCell(cells[i + 1], text, className);
  }
}

function setCell(td, text, className) {
  if (td.textContent !== text) td.textContent = text;
  if (td.className !== className) td.className = className;
}

const calm = window.matchMedia ? window.matchMedia("(prefers-reduced-motion: reduce)") : null;

function flash(tr) {
  if (!tr.animate || tr.flashing) return;           // flashing already: let it run
  if (calm && calm.matches) return;                 // the user asked for less motion
  if (!flashFrames) {
    const color = getComputedStyle(document.documentElement).getPropertyValue("--flash").trim();
    flashFrames = [{ backgroundColor: color || "#264f78" }, { backgroundColor: "transparent" }];
  }
  const animation = tr.animate(flashFrames, FLASH);
  tr.flashing = animation;
  animation.onfinish = animation.oncancel = () => { tr.flashing = null; };
}

// The text and class of a cell.
function cellFor(column, value) {
  if (value === undefined || value === null) return ["", ""];
  if (typeof value === "number") {
    const money = /px|price|cost|pnl|value|bid|ask|last|open/i.test(column);
    const text = money ? fmt.money.format(value)
      : /(^|_)ts$|_at$/.test(column) ? fmt.time.format(new Date(value)) : fmt.number.format(value);
    // Zero is neither green nor red.
    const sign = /pnl|change/i.test(column) && value !== 0 ? (value < 0 ? " neg" : " pos") : "";
    return [text, "num" + sign];
  }
  if (typeof value === "object") return [JSON.stringify(value), ""];
  // Values become text, and a class only through className (any string is valid
  // there); the stylesheet knows the sides and statuses the demo uses.
  const text = String(value);
  return [text, column === "side" ? text : column === "status" ? "status-" + text : ""];
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
  let applied = 0;
  for (const n of rate.buckets) applied += n;
  el("rate").textContent = applied.toLocaleString();
  rate.i = (rate.i + 1) % rate.buckets.length;
  rate.buckets[rate.i] = 0;
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
