// expertune ui: the run list, live run pages, compare and jobs, drawn from the server's JSON (docs/ui.md).
// Hand-written, no build step, no external requests. In a report (`expertune report`) the data is embedded in
// the page (#report-data) and only the run page is drawn, without actions.
"use strict";

const REPORT = (() => {
  const node = document.getElementById("report-data");
  return node ? JSON.parse(node.textContent) : null;
})();
const SVGNS = "http://www.w3.org/2000/svg";
const state = { csrf: null, timers: [], view: null };

// ---- small helpers -------------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [key, value] of Object.entries(attrs || {})) if (value !== null && value !== undefined) node.setAttribute(key, value);
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v)) ? "–" :
  (Math.abs(v) >= 1000 || (Math.abs(v) < 1e-3 && v !== 0) ? Number(v).toExponential(2) : Number(v).toPrecision(digits));
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const t = Math.round(seconds);
  if (t < 60) return `${t} s`;
  if (t < 3600) return `${Math.floor(t / 60)} min ${t % 60} s`;
  return `${Math.floor(t / 3600)} h ${Math.floor((t % 3600) / 60)} min`;
}
const ago = (epoch) => epoch ? duration(Date.now() / 1000 - epoch) + " ago" : "–";
const enc = encodeURIComponent;
const imageUrl = (path, width) => REPORT ? (REPORT.images[path] || "") : `/api/image?path=${enc(path)}&w=${width || 0}`;

function notify(message, error = false) {
  const box = h("div", { class: error ? "error" : "" }, message);
  document.getElementById("status").append(box);
  setTimeout(() => box.remove(), error ? 9000 : 5000);
}
async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}
function every(ms, work) {
  let busy = false;
  const id = setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try { await work(); } catch (error) { console.warn(error); } finally { busy = false; }
  }, ms);
  state.timers.push(id);
}
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}
const tick = (v) => (Number.isInteger(v) ? String(v) : fmt(v, 3));
function stopTimers() { state.timers.forEach(clearInterval); state.timers = []; }

// ---- charts --------------------------------------------------------------------------------------------------
function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}
// series: [{name, cls, points: [[x, y]], env: [[x, lo, hi]], dash}]
function lineChart({ title, xLabel, yLabel, series, logY = false, height = 220, xDomain = null }) {
  const W = 640, H = height, L = 62, R = 14, T = 10, B = 40;
  const ys = (v) => (logY ? (v > 0 ? Math.log10(v) : null) : v);
  const all = series.flatMap((se) => se.points.filter((p) => p[1] !== null && ys(p[1]) !== null));
  const figure = h("figure", { class: "panel" }, h("figcaption", {}, title));
  if (!all.length) { figure.append(h("p", { class: "muted small" }, "no data yet")); return figure; }
  let [x0, x1] = xDomain || [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  if (x1 === x0) x1 = x0 + 1;
  const yv = all.map((p) => ys(p[1]));
  series.forEach((se) => (se.env || []).forEach((e) => { if (e[1] !== null) yv.push(ys(e[1])); if (e[2] !== null) yv.push(ys(e[2])); }));
  let y0 = Math.min(...yv.filter((v) => v !== null)), y1 = Math.max(...yv.filter((v) => v !== null));
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 0.5; y1 += Math.abs(y1) * 0.1 || 0.5; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${title}: ${yLabel} against ${xLabel}` });
  niceTicks(y0, y1, 4).forEach((t) => {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    svg.append(s("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end" }, logY ? fmt(Math.pow(10, t), 2) : tick(t)));
  });
  niceTicks(x0, x1, 6).filter((t) => xLabel !== "step" || Number.isInteger(t)).forEach((t) => {
    svg.append(s("line", { class: "axis", x1: px(t), x2: px(t), y1: H - B, y2: H - B + 4 }));
    svg.append(s("text", { x: px(t), y: H - B + 16, "text-anchor": "middle" }, tick(t)));
  });
  svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  svg.append(s("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle" },
    yLabel + (logY ? " (log scale)" : "")));
  const legend = h("div", { class: "legend" });
  series.forEach((se) => {
    if (se.env && se.env.length) {
      const ok = se.env.filter((e) => e[1] !== null && e[2] !== null);
      const top = ok.map((e) => `${px(e[0])},${py(ys(e[2]))}`), bottom = ok.slice().reverse().map((e) => `${px(e[0])},${py(ys(e[1]))}`);
      if (ok.length > 1) svg.append(s("polygon", { class: `env ${se.cls}`, points: top.concat(bottom).join(" ") }));
    }
    const pts = se.points.filter((p) => p[1] !== null && ys(p[1]) !== null);
    if (pts.length === 1) svg.append(s("circle", { class: se.cls, cx: px(pts[0][0]), cy: py(ys(pts[0][1])), r: 3 }));
    else svg.append(s("polyline", { class: `line ${se.cls}`, points: pts.map((p) => `${px(p[0])},${py(ys(p[1]))}`).join(" "),
      "stroke-dasharray": se.dash || null }));
    legend.append(h("span", { class: se.cls.replace("s", "k") }, se.name));
  });
  figure.append(svg, legend);
  return figure;
}

function scheduleChart(schedule) {
  const n = schedule.num_train_timesteps, W = 1100, H = 250, L = 40, R = 62, T = 12, B = 40;
  const snr = schedule.log10_snr.filter((p) => p[1] > -11);
  const v0 = Math.min(...snr.map((p) => p[1])), v1 = Math.max(...snr.map((p) => p[1]));
  const px = (t) => L + (t / (n - 1)) * (W - L - R);
  const py = (v) => T + (1 - (v - v0) / (v1 - v0 || 1)) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "The schedule: each expert's band of timesteps, and log10 SNR against the timestep" });
  const bandsTop = T, bandsH = H - T - B;
  schedule.bands.forEach((band) => {
    const cls = `bandrect s${band.expert % 8}${band.role === "peer" ? " peer" : ""}`;
    svg.append(s("rect", { class: cls, x: px(band.lo), y: bandsTop, width: Math.max(1, px(band.hi + 1 > n - 1 ? n - 1 : band.hi + 1) - px(band.lo)), height: bandsH }));
    const label = band.role === "peer" ? `peer expert: t ${band.lo}–${band.hi}` : `expert ${band.expert}: t ${band.lo}–${band.hi}`;
    svg.append(s("text", { x: (px(band.lo) + px(band.hi)) / 2, y: T + 14, "text-anchor": "middle" }, label));
  });
  const edges = new Set();
  schedule.bands.forEach((b) => { if (b.lo > 0) edges.add(b.lo); });
  [...edges].forEach((t) => {
    svg.append(s("line", { class: "handoff", x1: px(t), x2: px(t), y1: T, y2: H - B }));
    svg.append(s("text", { x: px(t) + 4, y: H - B - 6 }, `hand-off t=${t}`));
  });
  niceTicks(0, n - 1, 8).forEach((t) => {
    svg.append(s("line", { class: "axis", x1: px(t), x2: px(t), y1: H - B, y2: H - B + 4 }));
    svg.append(s("text", { x: px(t), y: H - B + 16, "text-anchor": "middle" }, t));
  });
  niceTicks(v0, v1, 5).forEach((v) => {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: py(v), y2: py(v) }));
    svg.append(s("text", { x: W - R + 6, y: py(v) + 4 }, `1e${Math.round(v)}`));
  });
  svg.append(s("polyline", { class: "snr", points: snr.map((p) => `${px(p[0])},${py(p[1])}`).join(" ") }));
  svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(s("line", { class: "axis", x1: W - R, x2: W - R, y1: T, y2: H - B }));
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "timestep t (0 = clean image, high = pure noise)"));
  svg.append(s("text", { x: W - 10, y: (T + H - B) / 2, transform: `rotate(90 ${W - 10} ${(T + H - B) / 2})`, "text-anchor": "middle" }, "SNR (log scale)"));
  svg.append(s("text", { x: 14, y: (T + H - B) / 2, transform: `rotate(-90 14 ${(T + H - B) / 2})`, "text-anchor": "middle" }, "expert bands"));
  const note = schedule.zero_terminal_snr ? "zero-terminal SNR: SNR reaches 0 at the last timestep (not drawn)" : "";
  return h("figure", { class: "panel" }, h("figcaption", {}, "Schedule: the experts' bands and SNR"), svg,
    h("div", { class: "legend" }, ...schedule.bands.map((b) => h("span", { class: `k${b.expert % 8}` },
      `${b.role === "peer" ? "peer" : "expert " + b.expert} [${b.lo}, ${b.hi}]`)),
      h("span", { class: "muted" }, "log10 SNR(t): the curve, right axis")), note ? h("p", { class: "muted small" }, note) : null);
}

function bandsMini(bands, n = 1000) {
  const svg = s("svg", { class: "bands", viewBox: `0 0 140 14`, role: "img", "aria-label": bands.map((b) => `[${b.lo}, ${b.hi}]`).join(" ") });
  svg.append(s("rect", { x: 0, y: 0, width: 140, height: 14, class: "axis", fill: "none" }));
  bands.forEach((b) => svg.append(s("rect", { class: `bandrect s${b.expert % 8}${b.role === "peer" ? " peer" : ""}`,
    x: (b.lo / n) * 140, y: 0, width: Math.max(1, ((b.hi - b.lo + 1) / n) * 140), height: 14 })));
  return svg;
}

// ---- metrics into series -------------------------------------------------------------------------------------
function trainingSeries(metrics, key) {
  return Object.entries(metrics.training).map(([expert, cols], index) => {
    const d = cols[key];
    return { name: `expert ${expert}`, cls: `s${index % 8}`, points: d.step.map((x, i) => [x, d.mean[i]]),
      env: key === "loss" ? d.step.map((x, i) => [x, d.min[i], d.max[i]]) : [] };
  });
}
const SUBBAND = /^eval\/loss_(\d+)_(\d+)$/;
function heldOutGroups(metrics) {
  // {expert: {key: [[step, value]]}}: each expert's sub-bands (rows of a mixture carry "expert")
  const groups = {};
  for (const row of metrics.validation) {
    const expert = row.expert === undefined ? 0 : row.expert;
    for (const [key, value] of Object.entries(row)) {
      if (!SUBBAND.test(key) && key !== "eval/mixture_loss") continue;
      ((groups[expert] ||= {})[key] ||= []).push([row.step, value]);
    }
  }
  return groups;
}
const bandName = (key) => { const m = SUBBAND.exec(key); return m ? `t ${m[1]}–${m[2]}` : key.replace("eval/", ""); };
const byBand = (a, b) => (Number((SUBBAND.exec(a) || [0, 1e9])[1]) - Number((SUBBAND.exec(b) || [0, 1e9])[1]));

// ---- views ---------------------------------------------------------------------------------------------------
function stateBadge(value) { return h("span", { class: `badge state-${value}` }, value); }

async function viewRuns(main) {
  const selected = new Set();
  const table = h("div", { class: "scroll" });
  const compare = h("button", { class: "primary", disabled: true, onclick: () => {
    location.hash = `#/compare/${[...selected].map(enc).join("|")}`; } }, "Compare selected");
  main.append(h("h1", {}, "Runs"), h("div", { class: "row" }, compare,
    h("span", { class: "muted small" }, "select two or more runs to overlay their held-out losses and images")), table,
  startRunForm());
  let last = "";
  const draw = async () => {
    const data = await api("/api/runs");
    const text = JSON.stringify(data.runs);
    if (text === last) return;
    last = text;
    const rows = data.runs.map((run) => {
      const box = h("input", { type: "checkbox", "aria-label": `select ${run.path} to compare`, checked: selected.has(run.path),
        onchange: (e) => { e.target.checked ? selected.add(run.path) : selected.delete(run.path); compare.disabled = selected.size < 2; } });
      const progress = run.total_steps ? h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0,
        "aria-valuemax": run.total_steps, "aria-valuenow": run.step }, h("div", {})) : null;
      if (progress) progress.firstChild.style.width = `${Math.min(100, (100 * run.step) / run.total_steps)}%`;
      return h("tr", {}, h("td", {}, box),
        h("td", {}, h("a", { href: `#/run/${enc(run.path)}` }, run.path), h("div", { class: "muted small" }, run.detail)),
        h("td", {}, stateBadge(run.state)),
        h("td", { class: "num" }, `${run.step}${run.total_steps ? " / " + run.total_steps : ""}`, progress),
        h("td", { class: "num" }, run.state === "running" ? duration(run.eta_seconds) : "–"),
        h("td", {}, run.bands.length ? bandsMini(run.bands) : "–", h("div", { class: "small muted" },
          run.bands.map((b) => `${b.role === "peer" ? "peer" : "e" + b.expert} [${b.lo}, ${b.hi}]`).join(" · "))),
        h("td", { class: "num" }, fmt(run.last_eval_loss)), h("td", { class: "num" }, fmt(run.last_clip, 3)),
        h("td", { class: "num" }, run.checkpoints), h("td", { class: "small" }, ago(run.updated)));
    });
    fill(table, data.runs.length ? h("table", { id: "runs" }, h("thead", {}, h("tr", {},
      ["", "run", "state", "step", "ETA", "experts and bands (t)", "held-out loss (MSE)", "CLIP score (0–100)", "checkpoints", "updated"]
        .map((t, i) => h("th", { scope: "col", class: i >= 3 && i !== 5 ? "num" : null }, t)))), h("tbody", {}, rows))
      : h("p", { class: "muted" }, "No runs in this workspace yet: start one below, or point `expertune ui` at the folder your runs write under."));
  };
  await draw();
  every(2000, draw);
}

function startRunForm() {
  const input = h("input", { id: "config-file", list: "config-files", size: 48, placeholder: "config/stage1.env", "aria-label": "config file" });
  const list = h("datalist", { id: "config-files" });
  const refresh = () => api("/api/configs").then((d) => fill(list, d.configs.map((c) => h("option", { value: c })))).catch(() => {});
  refresh();
  const go = h("button", { class: "primary", onclick: async () => {
    try {
      const { job } = await api("/api/train", { config: input.value });
      notify(`queued: ${job.title}`);
      location.hash = `#/job/${job.id}`;
    } catch (error) { notify(error.message, true); }
  } }, "Start run");
  const choice = (label, values) => h("label", {}, label, h("select", { "data-init": label }, values.map((v) => h("option", { value: v }, v))));
  const field = (label, value, type = "text") => h("label", {}, label, h("input", { "data-init": label, value, type, size: type === "number" ? 6 : 22 }));
  const questions = h("div", { class: "row", id: "init-form" }, field("folder", "config"), choice("model", ["ssd-1b", "sdxl"]),
    choice("layout", ["two-stage", "mixture"]), field("GPU memory (GiB)", 24, "number"), choice("format", ["json", "toml"]),
    field("images folder", "datasets/images"), field("output folder", "output"));
  const value = (label) => questions.querySelector(`[data-init="${label}"]`).value;
  const init = h("button", { onclick: async () => {
    try {
      const { written } = await api("/api/init", { folder: value("folder"), model: value("model"), layout: value("layout"),
        gpu_memory: Number(value("GPU memory (GiB)")), format: value("format"), data: value("images folder"), output: value("output folder") });
      const configs = written.filter((p) => /(config\.json|\.toml)$/.test(p));
      notify(`wrote ${written.join(", ")}`);
      if (configs.length) input.value = configs[0];
      refresh();
    } catch (error) { notify(error.message, true); }
  } }, "Write starter config");
  return h("section", {}, h("h2", {}, "Start a run"), h("p", { class: "muted small" },
    "A config file inside the workspace (expertune TOML, SimpleTuner config.json / .toml, or config.env); paths in it are read from the workspace folder. Runs go one at a time, in order; closing this page or the UI never stops them."),
  h("div", { class: "row" }, h("label", {}, "config file", input), list, go),
  h("details", {}, h("summary", {}, "No config yet? Answer expertune init's questions"), h("p", { class: "muted small" },
    "Writes a starter config sized for your GPU into the folder (never overwriting a file), with a README; put your images and captions in the images folder, then start stage 1, and stage 2 when it ends."),
  questions, init));
}

async function viewRun(main, path) {
  const head = h("div", {}), sched = h("div", {}), live = h("div", {}), rest = h("div", {});
  main.append(head, sched, live, rest);
  let lastSchedule = "";
  let version = null, lastPage = "";
  const page = REPORT || await api(`/api/run?path=${enc(path)}`);
  const drawHead = (data) => {
    const sm = data.summary;
    fill(head, h("h1", {}, sm.path), h("div", { class: "row" }, stateBadge(sm.state),
      h("span", {}, `step ${sm.step}${sm.total_steps ? " of " + sm.total_steps : ""}`),
      sm.state === "running" ? h("span", {}, `ETA ${duration(sm.eta_seconds)}`) : null,
      h("span", { class: "muted small" }, sm.detail),
      !REPORT && sm.state === "running" ? h("button", { disabled: data.stop_requested, onclick: async (e) => {
        try { notify((await api("/api/stop", { run: sm.path })).message); e.target.disabled = true; } catch (error) { notify(error.message, true); }
      } }, data.stop_requested ? "stop requested" : "Stop (save a checkpoint, then stop)") : null),
    data.problem ? h("p", { class: "error-text" }, data.problem) : null,
    h("p", { class: "small" }, `last held-out loss ${fmt(sm.last_eval_loss)} · last CLIP score ${fmt(sm.last_clip, 3)} · ${sm.checkpoints} checkpoint(s)`));
  };
  // Each part is redrawn only when its data changed, and a part holding the keyboard focus (a form being filled
  // in, an image button) is left alone until the focus moves on.
  const parts = {};
  const part = (name, data, draw) => {
    const text = JSON.stringify(data === undefined ? null : data);
    if (!parts[name]) { parts[name] = { box: h("div", {}), text: null }; rest.append(parts[name].box); }
    const it = parts[name];
    if (it.text === text || it.box.contains(document.activeElement)) return;
    it.text = text;
    fill(it.box, draw());
  };
  const drawRest = (data) => {
    if (!data.schedule) { fill(sched); return; }
    const scheduleText = JSON.stringify(data.schedule);
    if (scheduleText !== lastSchedule) { lastSchedule = scheduleText; fill(sched, h("h2", {}, "Schedule"), scheduleChart(data.schedule)); }
    part("gallery", data.gallery, () => [h("h2", {}, "Validation gallery"), galleryView(data.gallery)]);
    if (!REPORT) {
      part("checkpoints", data.checkpoints, () => checkpointsView(path, data));
      part("samples", data.samples, () => samplesView(data.samples || []));
    }
    part("config", [data.config, data.run_json], () => [h("h2", {}, "Configuration"),
      h("details", {}, h("summary", {}, "resolved config"), h("pre", {}, JSON.stringify(data.config, null, 2))),
      h("details", {}, h("summary", {}, "run.json"), h("pre", {}, data.run_json ? JSON.stringify(data.run_json, null, 2) : "not written yet (the run has not finished)"))]);
  };
  const drawLive = (metrics) => {
    const groups = heldOutGroups(metrics);
    const held = Object.entries(groups).map(([expert, keys]) => lineChart({
      title: `Held-out loss per sub-band${Object.keys(groups).length > 1 ? ` (expert ${expert})` : ""}`,
      xLabel: "step", yLabel: "held-out loss (MSE)",
      series: Object.keys(keys).sort(byBand).map((k, i) => ({ name: bandName(k), cls: `s${i % 8}`, points: keys[k] })) }));
    const clipKeys = [...new Set(metrics.validation.flatMap((r) => Object.keys(r).filter((k) => k.startsWith("clip/"))))].sort();
    const clip = clipKeys.length ? lineChart({ title: "CLIP score per image", xLabel: "step", yLabel: "CLIP score (0–100)",
      series: clipKeys.map((k, i) => ({ name: k.slice(5), cls: `s${i % 8}`, points: metrics.validation.filter((r) => r[k] !== undefined).map((r) => [r.step, r[k]]) })) }) : null;
    fill(live, h("h2", {}, "Training"), h("div", { class: "grid2" },
      lineChart({ title: "Training loss (mean; band: min–max)", xLabel: "step", yLabel: "loss (MSE)", series: trainingSeries(metrics, "loss") }),
      lineChart({ title: "Learning rate", xLabel: "step", yLabel: "learning rate", series: trainingSeries(metrics, "lr") }),
      lineChart({ title: "Gradient norm", xLabel: "step", yLabel: "grad norm (L2, before clipping)", series: trainingSeries(metrics, "grad_norm") })),
    h("h2", {}, "Held-out loss and CLIP"), h("div", { class: "grid2", id: "heldout" }, held.length ? held : h("p", { class: "muted" }, "no validation yet"), clip),
    metrics.bad_lines ? h("p", { class: "error-text small" }, `${metrics.bad_lines} unreadable line(s) of metrics.jsonl skipped`) : null,
    h("p", { class: "muted small", id: "metrics-step" }, `metrics up to step ${metrics.last_step}`));
  };
  drawHead(page);
  if (REPORT) { drawLive(REPORT.metrics); drawRest(page); return; }
  drawRest(page);
  lastPage = JSON.stringify(page);
  const pollMetrics = async () => {
    const data = await api(`/api/metrics?path=${enc(path)}&points=600${version ? "&version=" + enc(version) : ""}`);
    version = data.version;
    if (!data.unchanged) drawLive(data);
  };
  await pollMetrics();
  every(1000, pollMetrics);
  every(3000, async () => {
    const data = await api(`/api/run?path=${enc(path)}`);
    const text = JSON.stringify(data);
    if (text === lastPage) return;
    lastPage = text;
    drawHead(data);
    drawRest(data);
  });
}

function galleryView(gallery) {
  if (!gallery || !gallery.groups.length) return h("p", { class: "muted" }, "no validation images yet");
  const box = h("div", {});
  let showAll = false;
  const draw = () => {
    const steps = gallery.steps, limit = 10;
    const shown = showAll || steps.length <= limit ? steps :
      [...new Set(Array.from({ length: limit }, (_, i) => steps[Math.round((i * (steps.length - 1)) / (limit - 1))]))];
    fill(box, steps.length > limit ? h("button", { onclick: () => { showAll = !showAll; draw(); } },
      showAll ? `show ${limit} steps` : `show all ${steps.length} steps`) : null,
    ...gallery.groups.map((group) => h("section", {}, h("h3", {}, group.name === "chain" ? "the whole chain" : group.name),
      h("div", { class: "scroll" }, h("table", { class: "gallery" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "image \\ step"), ...shown.map((st) => h("th", { scope: "col" }, `step ${st}`)))),
        h("tbody", {}, group.rows.map((row) => h("tr", {}, h("th", { scope: "row" }, row.image),
          ...shown.map((st) => {
            const path = row.cells[String(st)];
            const score = ((gallery.clip || {})[String(st)] || {})[row.image];
            if (!path) return h("td", {}, "–");
            const title = `${group.name} · ${row.image} · step ${st}`;
            return h("td", {}, h("button", { class: "cell", "aria-label": `open ${title}`, onclick: () => openImage(path, title) },
              h("img", { src: imageUrl(path, 192), loading: "lazy", alt: title })),
            score !== undefined ? h("div", { class: "score" }, `CLIP ${fmt(score, 3)}`) : null);
          })))))))));
  };
  draw();
  return box;
}

function openImage(path, title) {
  const dialog = document.getElementById("viewer");
  document.getElementById("viewer-img").src = imageUrl(path, 0);
  document.getElementById("viewer-img").alt = title;
  document.getElementById("viewer-title").textContent = title;
  dialog.showModal();
}

function checkpointsView(path, data) {
  const rows = (data.checkpoints || []).map((c) => {
    const formats = h("select", { "aria-label": `export layouts of ${c.name}` },
      h("option", { value: "diffusers,single_file" }, "both layouts"), h("option", { value: "diffusers" }, "diffusers"),
      h("option", { value: "single_file" }, "single file (ComfyUI / A1111)"));
    const precision = h("select", { "aria-label": `precision of ${c.name}` }, ["fp32", "fp16", "bf16"].map((p) => h("option", { value: p }, p)));
    const prompt = h("input", { value: defaultPrompt(data), size: 28, "aria-label": `prompt for ${c.name}` });
    const seed = h("input", { type: "number", value: 0, min: 0, size: 5, "aria-label": "seed" });
    const guidance = h("input", { type: "number", value: 5, step: 0.5, min: 0, size: 4, "aria-label": "guidance" });
    const steps = h("input", { type: "number", value: 20, min: 1, size: 4, "aria-label": "inference steps" });
    const submit = async (route, body) => {
      try { const { job } = await api(route, body); notify(`queued: ${job.title}`); } catch (error) { notify(error.message, true); }
    };
    return h("tr", {}, h("td", {}, c.name), h("td", { class: "num" }, c.step),
      h("td", {}, c.complete ? "complete" : h("span", { class: "error-text" }, "incomplete or damaged")), h("td", { class: "num" }, c.experts),
      h("td", {}, h("div", { class: "row" }, formats, precision, h("button", { disabled: !c.complete, "data-action": "export",
        onclick: () => submit("/api/export", { run: path, checkpoint: c.name, formats: formats.value, precision: precision.value }) }, "Export"))),
      h("td", {}, h("div", { class: "row" }, h("label", {}, "prompt", prompt), h("label", {}, "seed", seed), h("label", {}, "guidance", guidance),
        h("label", {}, "steps", steps), h("button", { disabled: !c.complete, "data-action": "sample",
          onclick: () => submit("/api/sample", { run: path, checkpoint: c.name, prompt: prompt.value, seed: Number(seed.value),
            guidance: Number(guidance.value), steps: Number(steps.value) }) }, "Sample now"))));
  });
  return h("section", {}, h("h2", {}, "Checkpoints"), rows.length ? h("div", { class: "scroll" }, h("table", { id: "checkpoints" },
    h("thead", {}, h("tr", {}, ["name", "step", "state", "experts", "export (to exports/checkpoint-N)", "sample through the chain of its experts"]
      .map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows))) : h("p", { class: "muted" }, "no checkpoint yet"),
  rows.length > 1 ? h("p", { class: "muted small" }, "Sample several checkpoints with the same prompt, seed, guidance and steps: they line up side by side under Samples.") : null);
}

function defaultPrompt(data) {
  const validation = (data.config || {}).validation || {};
  return validation.validation_prompt || "";
}

function sampleSettings(job) {
  // what a sample job was asked for, read back from its argument list (expertune generate's flags)
  const value = (flag) => { const i = job.args.indexOf(flag); return i >= 0 ? job.args[i + 1] : ""; };
  const checkpoint = (value("--expert").match(/checkpoint-\d+$/) || ["?"])[0];
  return { checkpoint, step: Number(checkpoint.split("-")[1]) || 0,
    key: `“${value("--prompt")}” · seed ${value("--seed")} · guidance ${value("--guidance")} · ${value("--steps")} steps` };
}

function samplesView(samples) {
  if (!samples.length) return null;
  const groups = new Map();
  samples.forEach((job) => {
    const settings = sampleSettings(job);
    if (!groups.has(settings.key)) groups.set(settings.key, []);
    groups.get(settings.key).push([settings, job]);
  });
  return h("section", { id: "samples" }, h("h2", {}, "Samples"), h("p", { class: "muted small" },
    "Grouped by prompt, seed, guidance and steps; one image per checkpoint, oldest first."),
  [...groups.entries()].map(([key, items]) => h("div", {}, h("h3", {}, key), h("div", { class: "samples" },
    items.sort((a, b) => a[0].step - b[0].step).map(([settings, job]) => h("figure", {},
      job.state === "finished" && job.output ? h("button", { class: "cell", onclick: () => openImage(job.output, `${settings.checkpoint}: ${key}`) },
        h("img", { src: imageUrl(job.output, 256), alt: `${settings.checkpoint}: ${key}` })) : null,
      h("figcaption", {}, stateBadge(job.state), " ", h("a", { href: `#/job/${job.id}` }, settings.checkpoint))))))));
}

async function viewCompare(main, paths) {
  main.append(h("h1", {}, "Compare runs"));
  if (paths.length < 2) {
    main.append(h("p", {}, "Pick two or more runs on the ", h("a", { href: "#/" }, "run list"), " and press “Compare selected”."));
    return;
  }
  const pages = await Promise.all(paths.map((p) => api(`/api/run?path=${enc(p)}`)));
  const metrics = await Promise.all(paths.map((p) => api(`/api/metrics?path=${enc(p)}&points=400`)));
  const overBands = [], overSteps = [];
  paths.forEach((path, i) => {
    const groups = heldOutGroups(metrics[i]);
    Object.entries(groups).forEach(([expert, keys]) => {
      const points = [];
      Object.keys(keys).filter((k) => SUBBAND.test(k)).sort(byBand).forEach((k) => {
        const [, lo, hi] = SUBBAND.exec(k).map(Number), last = keys[k][keys[k].length - 1][1];
        points.push([lo, last], [hi, last]);
      });
      const suffix = Object.keys(groups).length > 1 ? ` e${expert}` : "";
      overBands.push({ name: path + suffix, cls: `s${i % 8}`, points, dash: expert > 0 ? "5 3" : null });
    });
    overSteps.push({ name: path, cls: `s${i % 8}`, points: metrics[i].validation.filter((r) => r["eval/loss"] !== undefined || r["eval/mixture_loss"] !== undefined)
      .map((r) => [r.step, r["eval/mixture_loss"] ?? r["eval/loss"]]) });
  });
  main.append(h("div", { class: "grid2" },
    lineChart({ title: "Held-out loss across the schedule (last validation of each run)", xLabel: "timestep t (each sub-band)",
      yLabel: "held-out loss (MSE)", series: overBands, xDomain: [0, 999] }),
    lineChart({ title: "Held-out loss over steps (mean over the run's sub-bands)", xLabel: "step", yLabel: "held-out loss (MSE)", series: overSteps })));
  const names = [...new Set(pages.flatMap((p) => (p.gallery ? p.gallery.groups.flatMap((g) => g.rows.map((r) => `${g.name} · ${r.image}`)) : [])))].sort();
  const cell = (page, name) => {
    for (const group of (page.gallery || { groups: [] }).groups) for (const row of group.rows) {
      if (`${group.name} · ${row.image}` !== name) continue;
      const steps = Object.keys(row.cells).map(Number).sort((a, b) => a - b), last = steps[steps.length - 1];
      return h("figure", {}, h("button", { class: "cell", onclick: () => openImage(row.cells[String(last)], `${page.summary.path} · ${name} · step ${last}`) },
        h("img", { src: imageUrl(row.cells[String(last)], 256), loading: "lazy", alt: `${page.summary.path} ${name} step ${last}` })),
      h("figcaption", { class: "small" }, `${page.summary.path} · step ${last}`));
    }
    return h("p", { class: "muted small" }, `${page.summary.path}: –`);
  };
  main.append(h("h2", {}, "Images side by side (last validation; same prompts and seeds)"),
    h("div", { id: "compare-images" }, names.map((name) => h("section", {}, h("h3", {}, name),
      h("div", { class: "sidebyside" }, pages.map((page) => cell(page, name)))))));
}

async function viewJobs(main) {
  const box = h("div", { class: "scroll" });
  main.append(h("h1", {}, "Jobs"), h("p", { class: "muted small" },
    "Training runs and samples use the device: one at a time, in order; exports run one at a time beside them. The queue is kept in the workspace (.expertune-ui/) and survives a restart of the UI."), box, startRunForm());
  let last = "";
  const draw = async () => {
    const { jobs } = await api("/api/runs");
    const text = JSON.stringify(jobs);
    if (text === last) return;
    last = text;
    fill(box, jobs.length ? h("table", { id: "jobs" }, h("thead", {}, h("tr", {}, ["job", "state", "exit code", "started", "ended", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, jobs.map((job) => h("tr", {}, h("td", {}, h("a", { href: `#/job/${job.id}` }, job.title), h("div", { class: "muted small" }, job.lane)),
        h("td", {}, stateBadge(job.state)), h("td", { class: "num" }, job.rc ?? "–"), h("td", { class: "small" }, ago(job.started)),
        h("td", { class: "small" }, ago(job.ended)),
        h("td", {}, ["queued", "running"].includes(job.state) ? h("button", { onclick: async () => {
          try { await api("/api/cancel", { id: job.id }); notify(job.state === "running" ? "sent SIGTERM: it saves a checkpoint and stops" : "cancelled"); } catch (error) { notify(error.message, true); }
        } }, job.state === "running" ? "Stop" : "Cancel") : null)))))
      : h("p", { class: "muted" }, "No jobs yet."));
  };
  await draw();
  every(2000, draw);
}

async function viewJob(main, id) {
  const head = h("div", {}), pre = h("pre", { class: "log", id: "job-log", tabindex: 0, "aria-label": "job log" });
  main.append(h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")), head, pre);
  let offset = 0;
  const poll = async () => {
    const { jobs } = await api("/api/runs");
    const job = jobs.find((j) => j.id === id);
    if (!job) { fill(head, h("p", { class: "error-text" }, "no such job")); return; }
    fill(head, h("h1", {}, job.title), h("div", { class: "row" }, stateBadge(job.state),
      job.rc !== null ? h("span", {}, `exit code ${job.rc}`) : null,
      job.run ? h("a", { href: `#/run/${enc(job.run)}` }, `run page: ${job.run}`) : null));
    const data = await api(`/api/log?id=${enc(id)}&offset=${offset}`);
    if (data.text) {
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
      pre.append(data.text);
      if (stick) pre.scrollTop = pre.scrollHeight;
    }
    offset = data.offset;
  };
  await poll();
  every(1000, poll);
}

// ---- routing -------------------------------------------------------------------------------------------------
async function route() {
  stopTimers();
  const main = document.getElementById("main");
  fill(main);
  const hash = decodeURI(location.hash || "#/");
  document.querySelectorAll("#nav a").forEach((a) => a.toggleAttribute("aria-current", false));
  const section = hash.startsWith("#/compare") ? "#/compare" : hash.startsWith("#/job") ? "#/jobs" : "#/";
  const current = document.querySelector(`#nav a[href="${section}"]`);
  if (current) current.setAttribute("aria-current", "page");
  try {
    if (hash.startsWith("#/run/")) await viewRun(main, decodeURIComponent(location.hash.slice(6)));
    else if (hash.startsWith("#/compare")) await viewCompare(main, location.hash.slice(10).split("|").filter(Boolean).map(decodeURIComponent));
    else if (hash.startsWith("#/jobs")) await viewJobs(main);
    else if (hash.startsWith("#/job/")) await viewJob(main, decodeURIComponent(location.hash.slice(6)));
    else await viewRuns(main);
  } catch (error) {
    main.append(h("p", { class: "error-text" }, `could not load: ${error.message}`));
  }
}

async function start() {
  if (REPORT) {
    document.getElementById("nav").remove();
    document.title = `expertune report: ${REPORT.summary.path}`;
    document.getElementById("workspace").textContent = "report (self-contained)";
    const main = document.getElementById("main");
    fill(main);
    await viewRun(main, REPORT.summary.path);
    return;
  }
  const session = await api("/api/session");
  state.csrf = session.csrf;
  document.getElementById("workspace").textContent = session.workspace;
  window.addEventListener("hashchange", route);
  await route();
}
start();
