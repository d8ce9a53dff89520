// The statecast dashboard: a live replica of the server's state, over /ws.
// It behaves like statecast.Replica (docs/client.md): sync with live, apply changes in
// seq order, reconnect with backoff and jitter, resume with subscribe-from under the
// same epoch, and fall back to a full sync on resync_required. Plain JavaScript, no
// build step, nothing fetched from elsewhere.
"use strict";

const MAX_ROWS = 2000;          // rows drawn per table (the rest are counted)
const PREFERRED = ["quotes", "orders", "executions", "positions"];

const replica = {
  data: new Map(),              // collection -> Map(key -> {value, seq})
  seq: -1,                      // last applied seq; -1 before the first sync
  epoch: null,
  pending: null,                // Map being filled by a snapshot in progress
  total: null,
  received: 0,
};
const view = { tables: new Map(), active: null, dirty: new Set(), flashes: new Map(), all: false };
const el = (id) => document.getElementById(id);
let ws = null;
let attempt = 0;
let changeTimes = [];

// -- connection --------------------------------------------------------------------
function connect() {
  setConn("connecting", "connecting…");
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  ws = new WebSocket(url);
  ws.onopen = () => {
    if (replica.seq >= 0 && replica.epoch) {
      send({ op: "subscribe", from: replica.seq, epoch: replica.epoch, id: "resume" });
      setConn("connecting", "resuming at seq " + replica.seq + "…");
    } else {
      fullSync();
    }
  };
  ws.onmessage = (event) => {
    for (const line of event.data.split("\n")) {
      if (line) handle(JSON.parse(line));
    }
  };
  ws.onclose = () => {
    ws = null;
    const delay = Math.min(10, 0.25 * 2 ** attempt) * (0.5 + Math.random());
    attempt += 1;
    setConn("down", "disconnected · reconnecting in " + delay.toFixed(1) + "s");
    setTimeout(connect, delay * 1000);
  };
}

function send(request) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(request));
}

function fullSync() {
  send({ op: "sync", live: true, id: "sync" });
  setConn("connecting", "syncing…");
}

// -- protocol ----------------------------------------------------------------------
function handle(f) {
  switch (f.type) {
    case "hello":
      break;
    case "snapshot_begin":
      replica.pending = new Map();
      replica.total = f.count ?? null;
      replica.received = 0;
      replica.beginEpoch = f.epoch;
      showProgress();
      break;
    case "record": {
      let coll = replica.pending.get(f.collection);
      if (!coll) replica.pending.set(f.collection, (coll = new Map()));
      coll.set(f.key, { value: f.value, seq: f.seq });
      replica.received += 1;
      if ((replica.received & 255) === 0) showProgress();
      break;
    }
    case "snapshot_end":
      // The new contents replace the old at once.
      replica.data = replica.pending;
      replica.pending = null;
      replica.seq = f.seq;
      replica.epoch = replica.beginEpoch;
      attempt = 0;
      hideProgress();
      rebuildAll();
      setConn("live", "live · synced " + f.count.toLocaleString() + " records");
      break;
    case "subscribed":
      attempt = 0;
      setConn("live", "live · resumed at seq " + f.seq);
      break;
    case "change":
      apply(f);
      break;
    case "heartbeat":
      break;
    case "error":
      if (f.code === "resync_required") {
        replica.seq = -1;       // our history is gone: start over
        fullSync();
      } else {
        setConn("down", f.code + ": " + f.message);
      }
      break;
    case "bye":
      setConn("down", "server is restarting");
      break;
  }
}

function apply(f) {
  if (f.seq <= replica.seq) return;                 // never apply twice
  if (f.seq !== replica.seq + 1) {                  // a gap: only a full sync repairs it
    replica.seq = -1;
    fullSync();
    return;
  }
  replica.seq = f.seq;
  let coll = replica.data.get(f.collection);
  if (!coll) replica.data.set(f.collection, (coll = new Map()));
  if (f.deleted) coll.delete(f.key);
  else coll.set(f.key, { value: f.value, seq: f.seq });
  changeTimes.push(performance.now());
  if (f.deleted) view.flashes.delete(f.collection + "\u0000" + f.key);
  else view.flashes.set(f.collection + "\u0000" + f.key, true);
  markDirty(f.collection);
}

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
  el("tables").append(section);
  const tab = document.createElement("button");
  tab.dataset.collection = name;
  tab.onclick = () => activate(name);
  el("tabs").append(tab);
  t = { name, section, note, thead, tbody, tab, columns: [], sortBy: null, desc: false };
  view.tables.set(name, t);
  const names = order(view.tables.keys());
  for (const n of names) {
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

function columnsOf(t, coll) {
  const seen = new Set(t.columns);
  let n = 0;
  for (const { value } of coll.values()) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const k of Object.keys(value)) if (!seen.has(k)) { seen.add(k); t.columns.push(k); }
    } else if (!seen.has("value")) { seen.add("value"); t.columns.push("value"); }
    if (++n > 50) break;
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
    t.tab.textContent = name;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = coll.size.toLocaleString();
    t.tab.append(count);
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
    for (const c of columns) {
      const cell = c === "value" && (typeof v !== "object" || v === null || Array.isArray(v)) ? v : v?.[c];
      tr.append(cellFor(c, cell));
    }
    body.append(tr);
  }
  t.tbody.replaceChildren(body);
}

function cellFor(column, value) {
  const td = document.createElement("td");
  if (value === undefined || value === null) { td.textContent = ""; return td; }
  if (typeof value === "number") {
    td.className = "num";
    const money = /px|price|cost|pnl|value|bid|ask|last|open/i.test(column);
    td.textContent = money ? value.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 4 })
      : /(^|_)ts$|_at$/.test(column) ? new Date(value).toLocaleTimeString() : value.toLocaleString();
    if (/pnl|change/.test(column)) td.classList.add(value < 0 ? "neg" : value > 0 ? "pos" : "");
  } else if (typeof value === "object") {
    td.textContent = JSON.stringify(value);
  } else {
    td.textContent = String(value);
    if (column === "side") td.className = value;
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
}, 250);

connect();
