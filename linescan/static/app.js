// linescan live page: polls /api/status and /api/defects every second, draws what it gets.
// No library, no build step, nothing from the network but this daemon (see linescan/live.py).
"use strict";

const POLL_MS = 1000;
const FIRST_LOAD = 200; // newest defects shown when the page opens
const MAX_SHOWN = 500; // defects kept on the page (older ones leave it, never the journal)
const MAPS_PER_CAMERA = 3; // segments drawn per camera, newest first
const SVG = "http://www.w3.org/2000/svg";
const NO_PICTURE =
  "data:image/svg+xml;utf8," +
  encodeURIComponent(
    '<svg xmlns="http://www.w3.org/2000/svg" width="324" height="160">' +
      '<rect width="100%" height="100%" fill="#e5e7eb"/>' +
      '<text x="50%" y="50%" text-anchor="middle" font-family="sans-serif" font-size="14" ' +
      'fill="#6b7280">no picture</text></svg>'
  );

const state = {
  next: null, // seq to ask for next
  defects: new Map(), // seq -> event
  status: null, // the latest /api/status answer
  segments: new Map(), // "camera/segment" -> extents
  lost: null, // why the last poll failed
};

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toLocaleString("en-GB", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function sig(value) {
  // scores and thresholds span 0.02 to 20: three significant digits suit both
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return Number(value.toPrecision(3)).toString();
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) {
    let why = String(response.status);
    try {
      why += ": " + (await response.json()).error;
    } catch (_) {
      /* not JSON */
    }
    throw new Error(url + " answered " + why);
  }
  return response.json();
}

// ------------------------------------------------------------------ defects

function metres(line) {
  const lpm = state.status ? state.status.lines_per_metre : 1000;
  return line / lpm;
}

function segmentOf(e) {
  const key = e.camera + "/" + e.segment;
  let s = state.segments.get(key);
  if (!s) {
    s = { camera: e.camera, segment: e.segment, first: e.line_start, last: e.line_end,
          width: 0, current: false, seqs: [] };
    state.segments.set(key, s);
  }
  return s;
}

function addDefect(e) {
  if (state.defects.has(e.seq)) return;
  state.defects.set(e.seq, e);
  const s = segmentOf(e);
  s.first = Math.min(s.first, e.line_start);
  s.last = Math.max(s.last, e.line_end);
  s.width = Math.max(s.width, e.x_end);
  s.seqs.push(e.seq);

  const img = el("img", {
    src: e.image || NO_PICTURE,
    alt: "defect " + e.seq + ": camera pixels with the region outlined, and its score map",
  });
  img.addEventListener("error", () => {
    img.src = NO_PICTURE;
  }, { once: true });
  const cap = el(
    "figcaption",
    {},
    el("b", {}, "#" + e.seq),
    " " + e.camera + " · " + fmt(e.position_m, 2) + " m · x " + e.x_start + "–" + e.x_end +
      " px · score " + sig(e.score_max) + " (threshold " + sig(e.threshold) + ") · " +
      e.area_px + " px²"
  );
  if (e.repeat) {
    cap.append(
      el("br"),
      el("span", { class: "rep" },
        "repeats every " + fmt(e.repeat.period_m, 2) + " m (" + e.repeat.period_lines +
        " lines), " + e.repeat.count + " in a row since #" + e.repeat.first_seq)
    );
  }
  const fig = el("figure", {
    class: "defect" + (e.repeat ? " repeat" : ""),
    "data-defect-seq": String(e.seq),
    id: "defect-" + e.seq,
  }, img, cap);
  const gallery = $("gallery");
  const none = $("no-defects");
  if (none) none.remove();
  // newest first: before the first shown defect with a lower seq
  let before = null;
  for (const child of gallery.children) {
    if (Number(child.dataset.defectSeq) < e.seq) {
      before = child;
      break;
    }
  }
  gallery.insertBefore(fig, before);
  while (gallery.children.length > MAX_SHOWN) {
    const last = gallery.lastElementChild;
    state.defects.delete(Number(last.dataset.defectSeq));
    last.remove();
  }
}

async function pollDefects() {
  for (let round = 0; round < 20; round++) {
    const url = state.next === null
      ? "/api/defects?limit=" + FIRST_LOAD
      : "/api/defects?since=" + state.next + "&limit=1000";
    const answer = await getJSON(url);
    for (const e of answer.events) addDefect(e);
    const more = state.next !== null && answer.events.length === 1000;
    state.next = answer.next_seq;
    if (!more) break;
  }
  $("defect-count").textContent = state.defects.size
    ? "(" + state.defects.size + " shown, newest first)" : "";
}

// ------------------------------------------------------------------ status

function setStat(id, text, bad) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("bad", Boolean(bad));
}

function drawStatus(answer) {
  const ready = $("ready");
  ready.className = "badge " + (answer.ready ? "ready" : "not-ready");
  ready.textContent = answer.ready ? "READY" : "NOT READY";
  $("model").textContent = "model " + answer.model;
  const st = answer.status;
  if (!st) {
    setStat("s-rate", "no data yet");
    return;
  }
  const m = st.lines_inspected / answer.lines_per_metre;
  setStat("s-rate", fmt(answer.lines_per_s, 0));
  setStat("s-metres", fmt(m, 1) + " m");
  setStat("s-defects", String(st.defects));
  setStat("s-per-metre", m > 0 ? fmt(st.defects / m, 3) : "–");
  setStat("s-dropped", st.frames_dropped + " frames / " + st.lines_dropped + " lines",
          st.frames_dropped > 0);
  setStat("s-rejected", String(st.frames_rejected), st.frames_rejected > 0);
  setStat("s-gaps", String(st.sequence_gaps), st.sequence_gaps > 0);
  const q = st.queues || {};
  setStat("s-queues", "ingest " + q.ingest + " · inference " + q.inference + " · publish " +
          q.publish);
  for (const s of state.segments.values()) s.current = false;
  for (const [camera, c] of Object.entries(st.cameras || {})) {
    const s = segmentOf({ camera, segment: c.segment, line_start: c.line_start,
                          line_end: c.line });
    s.first = Math.min(s.first, c.line_start);
    s.last = Math.max(s.last, c.line);
    s.width = Math.max(s.width, c.width_px);
    s.current = true;
    s.web = (st.web || {})[camera] || null;
  }
}

function drawAlerts(answer) {
  const box = $("alerts");
  box.replaceChildren();
  if (state.lost) {
    box.append(el("div", { class: "conn-alert" },
      "No answer from the daemon (" + state.lost + "): what you see may be old."));
  }
  const st = answer && answer.status;
  if (st && st.final) {
    box.append(el("div", { class: "conn-alert" },
      "The daemon has stopped (its final status): nothing is inspected now."));
  } else if (answer && answer.status_age_s !== null && answer.status_age_s > 5) {
    box.append(el("div", { class: "conn-alert" },
      "No status from the inspection for " + fmt(answer.status_age_s, 0) +
      " s: is the daemon stuck?"));
  }
  for (const r of (st && st.repeats) || []) {
    box.append(el("div", { class: "repeat-alert", "data-repeat-first-seq": String(r.first_seq) },
      "Repeating defect on " + r.camera + ": x ≈ " + r.x_px + " px, every " +
      fmt(r.period_m, 2) + " m (" + r.period_lines + " lines), " + r.count +
      " in a row since #" + r.first_seq + ". Check the rollers."));
  }
}

// ------------------------------------------------------------------ roll maps

function drawMaps() {
  const box = $("maps");
  const byCamera = new Map();
  for (const s of state.segments.values()) {
    if (!byCamera.has(s.camera)) byCamera.set(s.camera, []);
    byCamera.get(s.camera).push(s);
  }
  if (!byCamera.size) return;
  box.replaceChildren();
  for (const camera of [...byCamera.keys()].sort()) {
    const segs = byCamera.get(camera).sort((a, b) => b.segment - a.segment);
    for (const s of segs.slice(0, MAPS_PER_CAMERA)) box.append(drawMap(s));
  }
}

function drawMap(s) {
  const W = 240, H = 420, L = 46, T = 8, B = 22, R = 8;
  const pw = W - L - R, ph = H - T - B;
  const width = Math.max(s.width, 1);
  const span = Math.max(s.last - s.first, 1);
  const X = (x) => L + (x / width) * pw;
  const Y = (line) => T + ((line - s.first) / span) * ph;
  const root = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H,
    role: "img", "aria-label": "roll map of " + s.camera + " segment " + s.segment });
  let left = 0, right = width;
  if (s.current && s.web) {
    if (s.web.left_px !== null) left = s.web.left_px;
    if (s.web.right_px !== null) right = s.web.right_px;
  }
  root.append(svg("rect", { class: "web", x: X(left), y: T, width: X(right) - X(left),
    height: ph }));
  if (s.current && s.web) {
    for (const x of [s.web.left_px, s.web.right_px]) {
      if (x !== null) root.append(svg("line", { class: "edge", x1: X(x), x2: X(x), y1: T,
        y2: T + ph }));
    }
  }
  for (let i = 0; i <= 4; i++) {
    const line = s.first + (span * i) / 4;
    root.append(svg("text", { class: "axis", x: L - 4, y: Y(line) + 3, "text-anchor": "end" },
      fmt(metres(line), 1) + " m"));
  }
  root.append(svg("text", { class: "axis", x: L, y: H - 6 }, "0"));
  root.append(svg("text", { class: "axis", x: W - R, y: H - 6, "text-anchor": "end" },
    width + " px"));
  if (s.current) {
    root.append(svg("line", { class: "now", x1: L, x2: L + pw, y1: Y(s.last), y2: Y(s.last) }));
  }
  // the first defects of a series were published before it was one: the status names them
  const inSeries = new Set();
  const st = state.status && state.status.status;
  for (const r of (st && st.repeats) || []) for (const q of r.seqs || []) inSeries.add(q);
  for (const seq of s.seqs) {
    const e = state.defects.get(seq);
    if (!e) continue;
    const cx = X((e.x_start + e.x_end) / 2), cy = Y((e.line_start + e.line_end) / 2);
    const repeat = e.repeat || inSeries.has(e.seq);
    const cls = "mark" + (repeat ? " repeat" : "") +
      (e.score_max >= 2 * e.threshold ? " high" : "");
    const mark = svg("circle", { class: cls, cx, cy, r: repeat ? 5 : 4,
      "data-map-seq": String(e.seq) });
    mark.append(svg("title", {}, "#" + e.seq + ": " + fmt(e.position_m, 2) + " m, x " +
      Math.round((e.x_start + e.x_end) / 2) + " px, score " + sig(e.score_max)));
    mark.addEventListener("click", () => {
      const fig = $("defect-" + e.seq);
      if (fig) {
        fig.scrollIntoView({ behavior: "smooth", block: "center" });
        fig.classList.add("flash");
        setTimeout(() => fig.classList.remove("flash"), 1500);
      }
    });
    root.append(mark);
  }
  const caption = el("figcaption", {},
    el("b", {}, s.camera), " segment " + s.segment + (s.current ? " (now)" : "") + ": " +
    fmt(metres(s.first), 1) + "–" + fmt(metres(s.last), 1) + " m, " + s.seqs.length +
    " defects");
  return el("figure", { class: "map", "data-camera": s.camera, "data-segment":
    String(s.segment) }, caption, root);
}

// ------------------------------------------------------------------ the loop

async function tick() {
  let answer = state.status;
  try {
    answer = await getJSON("/api/status");
    state.status = answer;
    drawStatus(answer);
    await pollDefects();
    state.lost = null;
  } catch (err) {
    state.lost = err.message;
    const ready = $("ready");
    ready.className = "badge unknown";
    ready.textContent = "NO ANSWER";
  }
  drawAlerts(answer);
  drawMaps();
  document.body.dataset.updated = String(Date.now());
  setTimeout(tick, POLL_MS);
}

document.addEventListener("DOMContentLoaded", tick);
