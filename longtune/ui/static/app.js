// longtune UI: page behaviour. Untrusted text (paths, logs, errors) only ever goes into
// textContent, never into HTML.
"use strict";

const COLORS = ["#2f5bea", "#e67e22", "#1a7f4b", "#c0392b", "#8e44ad", "#16a085", "#7f8c8d", "#d35400"];

// Whole steps only on the x axis.
const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];

function $(selector) {
  return document.querySelector(selector);
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, body) {
  const options = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    // The UI is restarting or gone: say so, and let the caller try again later.
    return { ok: false, status: 0, data: { detail: `cannot reach the UI server (${e.message})` } };
  }
  if (response.status === 401) {
    // The UI was restarted (a new token): the old cookie no longer opens it.
    const banner = $("#auth-lost");
    if (banner) banner.hidden = false;
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = { detail: `HTTP ${response.status}` };
  }
  return { ok: response.ok, status: response.status, data };
}

function basename(path) {
  return String(path || "-").replace(/\/+$/, "").split("/").pop();
}

// ---- charts ---------------------------------------------------------------------------------

function makeChart(container, series, yLabel) {
  const opts = {
    width: Math.max(300, container.clientWidth),
    height: 220,
    scales: { x: { time: false } },
    legend: { show: true },
    cursor: { drag: { x: true, y: false } },
    series: [{ label: "step" }, ...series],
    axes: [{ label: "step", incrs: STEP_INCRS }, { label: yLabel || "", size: 64, values: (u, ticks) => ticks.map(formatTick) }],
  };
  const chart = new uPlot(opts, [[], ...series.map(() => [])], container);
  window.addEventListener("resize", () => {
    chart.setSize({ width: Math.max(300, container.clientWidth), height: 220 });
  });
  return chart;
}

function formatTick(v) {
  if (v == null) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

function line(label, color, extra) {
  return Object.assign({ label, stroke: color, width: 2, spanGaps: true }, extra || {});
}

function evalLine(label, color) {
  return line(label, color, { points: { show: true, size: 7 }, dash: [6, 4] });
}

function planLine(label, color) {
  return line(label, color, { dash: [3, 3], points: { show: false } });
}

// ---- runs page ------------------------------------------------------------------------------

function runsPage() {
  const body = $("#runs-body");
  const picked = new Set();

  function render(runs) {
    body.replaceChildren();
    if (!runs.length) {
      const link = el("a", { href: "/new", text: "Start one." });
      body.append(el("tr", { class: "empty" }, el("td", { colSpan: 11 }, "No runs yet. ", link)));
      return;
    }
    for (const r of runs) {
      const box = el("input", { type: "checkbox", class: "pick", value: r.name, checked: picked.has(r.name) });
      box.addEventListener("change", () => (box.checked ? picked.add(r.name) : picked.delete(r.name)));
      const bar = el("progress", { max: 1, value: r.progress || 0 });
      // Wall time since the first start, and under it the training time of all the run's processes.
      const times = el("td", { class: "times", title: "wall time since the first start; training time" }, r.display.duration);
      if (r.train_time_s != null) times.append(el("span", { class: "muted sub", text: `train ${r.display.train_time}` }));
      body.append(
        el(
          "tr",
          { "data-name": r.name, "data-state": r.state },
          el("td", {}, box),
          el("td", { class: "name" }, el("a", { href: `/runs/${encodeURIComponent(r.name)}`, text: r.name })),
          el("td", {}, el("span", { class: `badge ${r.state}`, text: r.status, title: r.error || "" })),
          el("td", { class: "progress" }, r.display.progress, bar),
          el("td", { class: "num", text: r.display.train_loss }),
          el("td", { class: "num", text: r.display.eval_loss }),
          el("td", { class: "clip", title: r.model || "", text: basename(r.model) }),
          el("td", { class: "clip", title: r.data.join("\n"), text: r.data.map(basename).join(", ") || "-" }),
          el("td", { class: "when", title: r.display.started, text: r.display.started_short }),
          times,
          el("td", { text: r.display.check }),
        ),
      );
    }
  }

  render(JSON.parse($("#initial-runs").textContent));
  setInterval(async () => {
    const r = await api("/api/runs");
    if (r.ok) render(r.data.runs);
  }, 2000);
  $("#compare-selected").addEventListener("click", () => {
    const names = [...picked];
    window.location = "/compare?" + names.map((n) => `run=${encodeURIComponent(n)}`).join("&");
  });
}

// ---- new-run page ---------------------------------------------------------------------------

function formValues(form) {
  const values = {};
  for (const [key, value] of new FormData(form).entries()) values[key] = value;
  return values;
}

function newPage() {
  const form = $("#new-run");
  const errorBox = $("#form-error");
  const busy = $("#busy");

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  async function send(path) {
    showError("");
    busy.hidden = false;
    for (const b of form.querySelectorAll("button")) b.disabled = true;
    try {
      return await api(path, formValues(form));
    } finally {
      busy.hidden = true;
      for (const b of form.querySelectorAll("button")) b.disabled = false;
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const r = await send("/api/runs");
    if (r.ok) window.location = `/runs/${encodeURIComponent(r.data.name)}`;
    else showError(r.data.detail);
  });

  $("#preview").addEventListener("click", async () => {
    const r = await send("/api/preview");
    if (!r.ok) {
      showError(r.data.detail);
      $("#preview-out").hidden = true;
      return;
    }
    renderPreview(r.data);
  });
}

function renderPreview(p) {
  $("#preview-out").hidden = false;
  const errors = $("#preview-errors");
  errors.replaceChildren();
  if (p.errors.length) {
    const more = p.more_errors ? `\n… and ${p.more_errors} more` : "";
    errors.append(el("div", { class: "error", text: p.errors.join("\n") + more }));
  }
  const stats = $("#preview-stats");
  stats.replaceChildren();
  if (p.files.length) {
    const head = ["File", "Examples", "Tokens min / median / p95 / max", "Kept tokens", "Supervised", "Over context", "Packed sequences", "Padding"];
    stats.append(el("tr", {}, ...head.map((h) => el("th", { text: h }))));
    for (const f of p.files) {
      const tokens = `${f.token_min} / ${f.token_median} / ${Math.round(f.token_p95)} / ${f.token_max}`;
      const cells = [basename(f.file), f.examples, tokens, f.tokens, f.supervised_tokens, f.overlength, f.packed_sequences, f.padding_fraction.toFixed(4)];
      stats.append(el("tr", {}, ...cells.map((c) => el("td", { text: String(c) }))));
    }
  }
  const t = p.total;
  $("#preview-total").textContent = t
    ? `Total: ${t.documents} documents, ${t.tokens} tokens (${t.supervised_tokens} supervised) in ${t.packed_sequences} packed sequences of ${t.context_length}; padding ${t.padding_fraction.toFixed(4)}.`
    : "";
  const examples = $("#preview-examples");
  examples.replaceChildren();
  for (const e of p.examples) {
    const pre = el("pre");
    for (const s of e.segments) {
      if (s.skipped) pre.append(el("span", { class: "skipped", text: `\n[… ${s.skipped} tokens …]\n` }));
      else pre.append(el("span", { class: s.target ? "target" : "", text: s.text }));
    }
    const source = el("div", { class: "source", text: `${e.source} · ${e.tokens} tokens, ${e.target_tokens} with loss` });
    examples.append(el("div", { class: "example" }, source, pre));
  }
}

// ---- run page -------------------------------------------------------------------------------

function runPage() {
  const name = document.body.dataset.run;
  const enc = encodeURIComponent(name);
  const charts = {
    loss: makeChart($("#chart-loss"), [line("train loss", COLORS[0]), evalLine("eval loss", COLORS[1])], "loss"),
    lr: makeChart($("#chart-lr"), [line("learning rate", COLORS[2])]),
    tps: makeChart($("#chart-tps"), [line("tokens/s", COLORS[4])]),
    mem: makeChart($("#chart-mem"), [line("measured peak GiB", COLORS[3]), planLine("planned peak GiB", COLORS[5])]),
  };
  let byStep = new Map();
  let cursor = null;
  let state = null;
  // Set once a cancel was sent: the button stays disabled until the run has ended (a second
  // click would send a second signal, which stops the run at once without its checkpoint).
  let cancelSent = false;

  function redraw() {
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    const col = (key) => steps.map((s) => (byStep.get(s)[key] ?? null));
    charts.loss.setData([steps, col("loss"), col("eval_loss")]);
    charts.lr.setData([steps, col("lr")]);
    charts.tps.setData([steps, col("tokens_per_s")]);
    charts.mem.setData([steps, col("peak_memory_gb"), col("predicted_peak_gb")]);
    // The memory planner's prediction for the run's layout (train.plan_check): the same on
    // every step, drawn dashed beside what the steps measured.
    const planned = steps.map((s) => byStep.get(s).predicted_peak_gb).find((v) => v != null);
    $("#chart-mem").setAttribute("data-planned", planned == null ? "" : String(planned));
    const trainPoints = steps.filter((s) => byStep.get(s).loss != null).length;
    $("#chart-loss").setAttribute("data-points", String(trainPoints));
  }

  async function pollMetrics() {
    const query = cursor ? `?cursor=${encodeURIComponent(cursor)}` : "";
    const r = await api(`/api/runs/${enc}/metrics${query}`);
    if (!r.ok) return;
    if (r.data.reset) byStep = new Map();
    for (const rec of r.data.records) {
      const entry = byStep.get(rec.step) || {};
      for (const [k, v] of Object.entries(rec)) if (k !== "kind") entry[k] = v;
      byStep.set(rec.step, entry);
    }
    cursor = r.data.cursor;
    if (r.data.records.length || r.data.reset) redraw();
  }

  async function pollRun() {
    const r = await api(`/api/runs/${enc}`);
    if (!r.ok) return;
    const run = r.data;
    state = run.state;
    const badge = $("#status");
    badge.className = `badge ${run.state}`;
    badge.textContent = run.status;
    $("#progress").textContent = run.display.progress;
    $("#progress-bar").value = run.progress || 0;
    $("#train-loss").textContent = run.display.train_loss;
    $("#eval-loss").textContent = run.display.eval_loss;
    $("#started").textContent = run.display.started_short;
    $("#started").title = run.display.started;
    $("#duration").textContent = run.display.duration;
    $("#train-time").textContent = run.display.train_time;
    $("#eta").textContent = run.display.eta;
    $("#error").textContent = run.display.error || "";
    $("#error").hidden = !run.error;
    $("#message").textContent = run.display.message || "";
    $("#message").hidden = Boolean(run.error) || !run.message;
    $("#no-resume").textContent = run.resume_refusal || "";
    $("#no-resume").hidden = !run.resume_refusal;
    const live = ["running", "starting"].includes(run.state);
    if (!live) cancelSent = false;
    $("#cancel").hidden = !live;
    $("#cancel").disabled = cancelSent;
    $("#cancel").textContent = cancelSent ? "Cancelling…" : "Cancel run";
    $("#resume").hidden = !["cancelled", "failed"].includes(run.state) || Boolean(run.resume_refusal);
    $("#delete").hidden = live;
    const log = $("#log");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = run.log_tail || run.launch_output || "(no log yet)";
    if (atBottom) log.scrollTop = log.scrollHeight;
    $("#config").textContent = run.config_text;
    if (run.export_dir) {
      $("#export").hidden = false;
      $("#export-dir").textContent = run.export_dir;
      const check = run.export_check;
      const text = !check
        ? "not yet"
        : check.passed
          ? check.logits_checked === false
            ? `passed (tensors equal: ${check.tensors_equal_trained}; logits probe skipped: ${check.logits_skipped_because})`
            : `passed (transformers vs native logits rel. error ${Number(check.rel_err_vs_transformers).toExponential(2)}, tensors equal: ${check.tensors_equal_trained})`
          : `FAILED ${JSON.stringify(check)}`;
      $("#export-check").textContent = text;
    }
  }

  async function tick() {
    await Promise.all([pollRun(), pollMetrics()]);
    const live = state === "running" || state === "starting";
    setTimeout(tick, live ? 1500 : 5000);
  }

  $("#cancel").addEventListener("click", async () => {
    if (cancelSent) return;
    if (!window.confirm(`Cancel run ${name}? It finishes its step, writes a checkpoint and stops.`)) return;
    cancelSent = true;
    $("#cancel").disabled = true;
    $("#cancel").textContent = "Cancelling…";
    const r = await api(`/api/runs/${enc}/cancel`, {});
    if (!r.ok) {
      cancelSent = false; // nothing was sent: it may be tried again
      $("#error").textContent = r.data.detail;
      $("#error").hidden = false;
    }
    await pollRun();
  });
  $("#delete").addEventListener("click", async () => {
    const question = `Delete run ${name}? Its folder goes with everything in it: checkpoints, the exported model, metrics and logs. This cannot be undone.`;
    if (!window.confirm(question)) return;
    $("#delete").disabled = true;
    const r = await api(`/api/runs/${enc}/delete`, {});
    if (r.ok) {
      window.location = "/";
      return;
    }
    $("#error").textContent = r.data.detail;
    $("#error").hidden = false;
    $("#delete").disabled = false;
  });
  $("#resume").addEventListener("click", async () => {
    $("#resume").disabled = true;
    const r = await api(`/api/runs/${enc}/resume`, {});
    if (!r.ok) {
      $("#error").textContent = r.data.detail;
      $("#error").hidden = false;
    }
    $("#resume").disabled = false;
    await Promise.all([pollRun(), pollMetrics()]);
  });
  tick();
}

// ---- compare page ---------------------------------------------------------------------------

async function comparePage() {
  const names = JSON.parse($("#chosen-runs").textContent);
  const perRun = await Promise.all(
    names.map(async (n) => {
      const r = await api(`/api/runs/${encodeURIComponent(n)}/metrics`);
      return r.ok ? r.data.records : [];
    }),
  );
  const draw = (container, key, makeSeries) => {
    const steps = new Set();
    const values = perRun.map((records) => {
      const m = new Map();
      for (const rec of records) if (rec[key] != null) m.set(rec.step, rec[key]);
      for (const s of m.keys()) steps.add(s);
      return m;
    });
    const xs = [...steps].sort((a, b) => a - b);
    const series = names.map((n, i) => makeSeries(n, COLORS[i % COLORS.length]));
    const chart = makeChart(container, series, "loss");
    chart.setData([xs, ...values.map((m) => xs.map((s) => (m.has(s) ? m.get(s) : null)))]);
    container.setAttribute("data-series", String(names.length));
  };
  draw($("#chart-train"), "loss", line);
  draw($("#chart-eval"), "eval_loss", evalLine);
}

// ---- dispatch -------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "runs.html") runsPage();
  else if (page === "new.html") newPage();
  else if (page === "run.html") runPage();
  else if (page === "compare.html") comparePage();
});
