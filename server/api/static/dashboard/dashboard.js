// The dashboard's script: it reads the server's JSON endpoints and shows them. It holds no figures of its own.
// Polls every REFRESH_MS while the tab is visible; the slower-moving endpoints every SLOW_EVERY polls.
// With API keys on, the key entered is kept in this tab's sessionStorage and sent as a bearer token, never in a URL.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const SLOW_EVERY = 6;
  const KEY_STORAGE = "inference-server.dashboard.api-key";
  const WINDOWS = {hour: {seconds: 3600, bucket: "minute", bucketSeconds: 60, label: "last hour, per minute"},
                   day: {seconds: 86400, bucket: "hour", bucketSeconds: 3600, label: "last day, per hour"}};
  const ACTIVE_STATUSES = ["submitted", "in_progress"];
  const FINISHED_ITEMS = ["succeeded", "failed", "expired"];
  const FALLBACK_REASONS = {
    no_key: "GEMINI_API_KEY is not set", quota: "the Gemini quota was used up",
    timeout: "Gemini did not answer in time", unavailable: "Gemini was unavailable",
    invalid_answer: "Gemini's answer did not fit the report's schema", error: "Gemini failed"};
  const COLORS = {accent: "#1f4e79", error: "#b3261e", p95: "#a05a00"};

  const body = document.body;
  const root = body.dataset.root || "";
  const keysRequired = body.dataset.keys === "required";
  const $ = (selector, scope = document) => scope.querySelector(selector);
  const $$ = (selector, scope = document) => Array.from(scope.querySelectorAll(selector));

  const state = {window: "hour", polls: 0, timer: null, busy: false, again: false, retryAt: 0, awaitingKey: false,
                 thresholdsDirty: false, charts: new Map()};

  // ---- Formatting: every figure's text, and its raw JSON value in data-value ----
  const numbers = options => new Intl.NumberFormat("en-US", options);
  const INTEGER = numbers({maximumFractionDigits: 0});
  const ONE_DECIMAL = numbers({maximumFractionDigits: 1});
  const TWO_DECIMALS = numbers({maximumFractionDigits: 2});
  const PERCENT = numbers({minimumFractionDigits: 1, maximumFractionDigits: 1});
  const SIGNIFICANT = numbers({maximumSignificantDigits: 3});
  const CENTS = numbers({minimumFractionDigits: 2, maximumFractionDigits: 2});
  const SMALL_USD = numbers({maximumSignificantDigits: 2});
  const format = {
    int: value => INTEGER.format(value),
    ms: value => `${ONE_DECIMAL.format(value)} ms`,
    ratio: value => `${PERCENT.format(value * 100)}%`,
    rate: value => SIGNIFICANT.format(value),
    decimal: value => TWO_DECIMALS.format(value),
    usd: value => `$${value !== 0 && Math.abs(value) < 1 ? SMALL_USD.format(value) : CENTS.format(value)}`,
    text: value => String(value),
  };
  const PERIODS = {1: "second", 60: "minute", 3600: "hour", 86400: "day"};

  function showFigure(element, value, kind) {
    const missing = value === null || value === undefined;
    element.textContent = missing ? "–" : format[kind](value);
    element.dataset.value = missing ? "" : String(value);
  }

  function figure(name, value, kind) {
    $$(`[data-figure="${CSS.escape(name)}"]`).forEach(element => showFigure(element, value, kind));
  }

  function el(tag, attributes = {}, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value !== undefined && value !== null) element.setAttribute(name, value);
    }
    element.append(...children);
    return element;
  }

  function figureCell(name, value, kind) {
    const cell = el("td", {"data-figure": name});
    showFigure(cell, value, kind);
    return cell;
  }

  function age(since) {
    const seconds = Math.max(0, (Date.now() - Date.parse(since)) / 1000);
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
    return `${Math.round(seconds / 86400)} d`;
  }

  const clock = moment => new Date(moment).toLocaleTimeString("en-GB");
  const quota = policy => `${policy.count}/${PERIODS[policy.period_s] || `${policy.period_s} s`}` +
    (policy.burst !== policy.count ? ` (burst ${policy.burst})` : "");

  // ---- HTTP ----
  class HttpError extends Error {
    constructor(path, status, detail, retryAfter) {
      super(`${path}: ${status}${detail ? ` ${typeof detail === "string" ? detail : JSON.stringify(detail)}` : ""}`);
      this.status = status;
      this.detail = detail;
      this.retryAfter = retryAfter;
    }
  }

  // `accept`: error statuses whose body is still the answer (/health's 503 says what is down).
  async function api(path, {method = "GET", json, accept = []} = {}) {
    const headers = {Accept: "application/json"};
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    if (json !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(root + path, {method, headers, cache: "no-store",
                                                body: json === undefined ? undefined : JSON.stringify(json)});
    const answer = await response.json().catch(() => null);
    if (!response.ok && !accept.includes(response.status)) {
      throw new HttpError(path, response.status, answer && answer.detail,
                          Number(response.headers.get("Retry-After")) || 1);
    }
    return answer;
  }

  // ---- Charts (uPlot) ----
  const CHART_HEIGHT = 180;

  function chartWidth(container) {
    return Math.max(200, container.clientWidth);
  }

  function drawChart(id, signature, makeOptions, data) {
    const container = document.getElementById(id);
    const empty = $(".empty", container.parentElement);
    const current = state.charts.get(id);
    const hasData = data[0].length > 0;
    container.hidden = !hasData;
    empty.hidden = hasData;
    if (!hasData) {
      if (current) current.plot.destroy();
      state.charts.delete(id);
      return;
    }
    if (current && current.signature === signature) {
      current.plot.setData(data);
      return;
    }
    if (current) current.plot.destroy();
    const plot = new uPlot({...makeOptions(), width: chartWidth(container), height: CHART_HEIGHT}, data, container);
    state.charts.set(id, {plot, signature});
  }

  const resizer = new ResizeObserver(entries => {
    for (const entry of entries) {
      const chart = state.charts.get(entry.target.id);
      if (chart && !entry.target.hidden) chart.plot.setSize({width: chartWidth(entry.target), height: CHART_HEIGHT});
    }
  });
  $$(".chart").forEach(container => resizer.observe(container));

  const line = (label, stroke, kind) => ({label, stroke, width: 2, spanGaps: false, points: {show: true, size: 5},
                                         value: (u, v) => (v === null || v === undefined ? "–" : format[kind](v))});

  function timeOptions(series, yKind) {
    return {series: [{}, ...series], scales: {x: {time: true}},
            axes: [{}, {size: 56, values: (u, ticks) => ticks.map(v => format[yKind](v))}],
            cursor: {drag: {x: false, y: false}}};
  }

  function barOptions(labels) {
    return {
      scales: {x: {time: false, range: [-0.5, labels.length - 0.5]},
               y: {range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1]}},
      axes: [{splits: () => labels.map((_, index) => index), values: (u, ticks) => ticks.map(i => labels[i] ?? "")},
             {size: 80, values: (u, ticks) => ticks.map(v => format.usd(v))}],
      series: [{value: (u, v) => labels[v] ?? ""},
               {label: "saved", stroke: COLORS.accent, fill: "rgba(31, 78, 121, 0.55)", points: {show: false},
                paths: uPlot.paths.bars({size: [0.6, 64]}), value: (u, v) => (v === null ? "–" : format.usd(v))}],
      legend: {show: false}, cursor: {drag: {x: false, y: false}}};
  }

  // ---- Sections ----
  function renderServing(answer, window) {
    const total = answer.total;
    figure("serving.rps", total.throughput_rps, "rate");
    figure("serving.requests", total.requests, "int");
    figure("serving.p50", total.latency_ms.p50, "ms");
    figure("serving.p95", total.latency_ms.p95, "ms");
    figure("serving.errors", total.errors, "int");
    figure("serving.error_rate", total.error_rate, "ratio");
    figure("serving.cache_hit_ratio", total.cache_hit_ratio, "ratio");
    figure("serving.items", total.items, "int");
    $("#serving-window").textContent =
      `${WINDOWS[window].label}: ${clock(total.start)} to ${clock(total.end)}, every replica (from the database).`;

    const width = WINDOWS[window].bucketSeconds;
    const start = Date.parse(total.start) / 1000;
    const end = Date.parse(total.end) / 1000;
    const byIndex = new Map(answer.buckets.map(b => [Math.floor(Date.parse(b.start) / 1000 / width), b]));
    const columns = [[], [], [], [], []];
    if (answer.buckets.length) {
      for (let index = Math.floor(start / width); index * width < end; index += 1) {
        const bucket = byIndex.get(index);
        const seconds = Math.min(end, (index + 1) * width) - Math.max(start, index * width);
        columns[0].push(Math.max(start, index * width));
        columns[1].push(bucket ? bucket.throughput_rps : 0);
        columns[2].push(bucket ? bucket.errors / seconds : 0);
        columns[3].push(bucket ? bucket.latency_ms.p50 : null);
        columns[4].push(bucket ? bucket.latency_ms.p95 : null);
      }
    }
    drawChart("chart-traffic", "traffic", () => timeOptions(
      [line("requests/s", COLORS.accent, "rate"), line("errors/s", COLORS.error, "rate")], "rate"),
      [columns[0], columns[1], columns[2]]);
    drawChart("chart-latency", "latency", () => timeOptions(
      [line("p50", COLORS.accent, "ms"), line("p95", COLORS.p95, "ms")], "decimal"),
      [columns[0], columns[3], columns[4]]);
  }

  function renderLive(live) {
    // This process's figures cover every tenant: the server sends them to admin keys only (null otherwise).
    for (const id of ["#process-table", "#limits-tables"]) $(id).hidden = live === null;
    for (const note of document.querySelectorAll(".admin-only")) note.hidden = live !== null;
    if (live === null) return;
    const models = Object.entries(live.models);
    const batches = models.reduce((sum, [, m]) => sum + m.batches, 0);
    const items = models.reduce((sum, [, m]) => sum + m.items, 0);
    figure("serving.queue_depth", models.reduce((sum, [, m]) => sum + m.queue_depth, 0), "int");
    figure("serving.mean_batch_size", batches ? items / batches : null, "decimal");
    $("#process-models").replaceChildren(...models.map(([name, m]) => el("tr", {},
      el("th", {scope: "row"}, name), figureCell(`process.${name}.queue_depth`, m.queue_depth, "int"),
      figureCell(`process.${name}.batches`, m.batches, "int"),
      figureCell(`process.${name}.mean_batch_size`, m.mean_batch_size, "decimal"))));
    for (const layer of ["ingress", "egress"]) {
      const policies = live[layer];
      $(`#${layer}-off`).hidden = policies.length > 0;
      $(`#${layer}-table`).hidden = policies.length === 0;
      $(`#${layer}-rows`).replaceChildren(...policies.map(policy => el("tr", {},
        el("th", {scope: "row"}, policy.name), el("td", {}, quota(policy)),
        figureCell(`limits.${layer}.${policy.name}.allowed`, policy.allowed, "int"),
        figureCell(`limits.${layer}.${policy.name}.denied`, policy.denied, "int"))));
    }
  }

  function renderAlerts(alerts, breaches) {
    $("#alerts-admin-only").hidden = alerts !== null;
    const entries = [
      ...(alerts || []).map(alert => el("li", {"data-alert": alert.type},
        el("span", {class: "pill", "data-status": alert.severity}, alert.severity), " ", alert.message,
        alert.since ? el("span", {class: "muted"}, ` · since ${clock(alert.since)}`) : "")),
      ...breaches.map(breach => el("li", {"data-alert": `threshold:${breach.threshold}`},
        el("span", {class: "pill", "data-status": "warning"}, "warning"), " Threshold breached: ",
        breach.description))];
    $("#alert-list").replaceChildren(...entries);
    $("#alerts-none").hidden = entries.length > 0;
  }

  function renderBatch(stats, queue, jobs, active) {
    const items = stats.items.by_status;
    const activeCount = ACTIVE_STATUSES.reduce((sum, s) => sum + (stats.jobs.by_status[s] || 0), 0);
    figure("batch.queued", queue.waiting, "int");
    figure("batch.processed", FINISHED_ITEMS.reduce((sum, s) => sum + (items[s] || 0), 0), "int");
    figure("batch.active", activeCount, "int");
    figure("batch.success_rate", stats.success_rate, "ratio");
    figure("batch.jobs", stats.jobs.total, "int");

    $("#active-none").hidden = active.length > 0;
    $("#active-table").hidden = active.length === 0;
    $("#active-rows").replaceChildren(...active.map(job => el("tr", {"data-job": job.id},
      el("td", {title: job.id}, job.name || job.id.slice(0, 8)), el("td", {}, job.provider), el("td", {}, job.job_type),
      el("td", {}, job.status), el("td", {}, `${job.counts.succeeded + job.counts.failed}/${job.counts.total}`),
      el("td", {}, age(job.submitted_at || job.created_at)))));

    for (const list of $$("[data-breakdown]")) {
      const counts = Object.entries(queue[list.dataset.breakdown]);
      list.replaceChildren(...(counts.length ? counts.map(([name, count]) => {
        const value = el("span", {"data-figure": `queue.${list.dataset.breakdown}.${name}`});
        showFigure(value, count, "int");
        return el("li", {}, `${name}: `, value);
      }) : [el("li", {class: "muted"}, "empty")]));
    }

    $("#activity").replaceChildren(...(jobs.length ? jobs.map(job => el("li", {"data-job": job.id},
      el("span", {class: "muted"}, `${clock(job.updated_at)} `), `${job.name} (${job.provider} · ${job.job_type}): `,
      el("strong", {}, job.status.replace("_", " ")),
      ` · ${job.counts.succeeded}/${job.counts.total} items succeeded`))
      : [el("li", {class: "muted"}, "No job yet.")]));
  }

  function renderSavings(savings) {
    figure("batch.savings", savings.total.savings_usd, "usd");
    const groups = [["provider", savings.by_provider], ["job_type", savings.by_job_type]];
    $("#savings-table").hidden = Object.keys(savings.by_provider).length === 0;
    $("#savings-rows").replaceChildren(...groups.flatMap(([group, rows]) => Object.entries(rows).map(([name, money]) =>
      el("tr", {}, el("td", {}, group.replace("_", " ")), el("th", {scope: "row"}, name),
         figureCell(`savings.${group}.${name}.jobs`, money.jobs, "int"),
         figureCell(`savings.${group}.${name}.cost`, money.cost_usd, "usd"),
         figureCell(`savings.${group}.${name}.realtime`, money.realtime_cost_usd, "usd"),
         figureCell(`savings.${group}.${name}`, money.savings_usd, "usd")))));
    const charts = [["chart-savings-provider", savings.by_provider], ["chart-savings-type", savings.by_job_type]];
    for (const [id, rows] of charts) {
      const labels = Object.keys(rows);
      drawChart(id, labels.join("\u0000"), () => barOptions(labels),
                [labels.map((_, index) => index), labels.map(name => rows[name].savings_usd)]);
    }
  }

  function renderOverview(info, health, cache, count, scheduler) {
    $("#models").textContent = Object.entries(info.models).map(([role, model]) =>
      `${role}: ${model.name}${model.offline_stand_in ? " (offline stand-in)" : ""}`).join(" · ") +
      ` · cache: ${info.cache.backend}` + (keysRequired ? "" : " · no API keys (open server)");
    const pill = $("#health");
    pill.dataset.status = health.status;
    pill.textContent = `health: ${health.status}`;
    pill.title = Object.entries(health.checks).map(([name, check]) => `${name}: ${check.status}`).join(", ");
    figure("cache.backend", cache.backend, "text");
    figure("cache.entries", cache.entries, "int");
    figure("cache.hit_ratio", cache.hit_ratio, "ratio");
    figure("count.generations", count.generations, "int");
    figure("count.predictions", count.predictions, "int");
    figure("count.total", count.total, "int");
    const nextWindow = new Date(scheduler.next_window).toISOString().slice(0, 16).replace("T", " ");
    $("#batch-worker").textContent = scheduler.running
      ? `worker running here · next window ${nextWindow} UTC` : "worker not running here";
    $("#batch-worker-off").hidden = scheduler.mode !== "off";
  }

  // ---- Thresholds ----
  const thresholdForm = $("#threshold-form");
  const thresholdFields = $$("input", thresholdForm).map(input => input.name);

  function fillThresholds(values) {
    for (const name of thresholdFields) {
      const value = values[name];
      thresholdForm.elements[name].value = value === null || value === undefined ? "" : String(value);
    }
  }

  function clearThresholdErrors() {
    $$("[data-error-for]", thresholdForm).forEach(p => { p.textContent = ""; });
    $$("input", thresholdForm).forEach(input => input.removeAttribute("aria-invalid"));
  }

  function thresholdStatus(text, kind) {
    const status = $("#threshold-status");
    status.textContent = text;
    status.dataset.state = kind;
  }

  function thresholdBody() {
    const values = {};
    for (const name of thresholdFields) {
      const text = thresholdForm.elements[name].value.trim();
      if (text === "") {
        if (name !== "min_requests") values[name] = null;  // left out, min_requests takes its default
        continue;
      }
      const number = Number(text);
      // What is not a number goes as typed: the server's validation answers for it, shown beside the field.
      values[name] = Number.isFinite(number) ? number : text;
    }
    return values;
  }

  thresholdForm.addEventListener("input", () => { state.thresholdsDirty = true; });
  $("#threshold-reset").addEventListener("click", async () => {
    state.thresholdsDirty = false;
    clearThresholdErrors();
    thresholdStatus("", "");
    await loadThresholds();
  });

  async function loadThresholds() {
    try {
      const values = await api("/metrics/thresholds");
      if (!state.thresholdsDirty) fillThresholds(values);
    } catch (error) {
      handleError(error);
    }
  }

  thresholdForm.addEventListener("submit", async event => {
    event.preventDefault();
    clearThresholdErrors();
    thresholdStatus("Saving…", "saving");
    try {
      const saved = await api("/metrics/thresholds", {method: "PUT", json: thresholdBody()});
      state.thresholdsDirty = false;
      fillThresholds(saved);
      thresholdStatus(saved.updated.length ? `Saved: ${saved.updated.join(", ")} changed.` : "Saved: nothing changed.",
                      "saved");
    } catch (error) {
      if (!(error instanceof HttpError)) {
        thresholdStatus(`Not saved: could not reach the server (${error.message}).`, "error");
        return;
      }
      if (error.status === 422 && Array.isArray(error.detail)) {
        const general = [];
        for (const problem of error.detail) {
          const field = problem.loc && problem.loc[0] === "body" ? problem.loc[1] : undefined;
          const slot = field && $(`[data-error-for="${CSS.escape(String(field))}"]`, thresholdForm);
          if (slot) {
            slot.textContent = problem.msg;
            thresholdForm.elements[field].setAttribute("aria-invalid", "true");
          } else {
            general.push(problem.msg);
          }
        }
        thresholdStatus(`Not saved: ${general.length ? general.join("; ") : "fix the fields marked above."}`, "error");
      } else if (error.status === 403) {
        thresholdStatus("Not saved: this change needs an admin key (ADMIN_API_KEYS). Enter one above.", "error");
        askForKey("Thresholds can only be changed with an admin key.");
      } else {
        thresholdStatus(`Not saved: ${error.status === 401 ? "the key was refused" : error.message}`, "error");
        handleError(error);
      }
    }
  });

  // ---- The performance report ----
  $("#analysis-form").addEventListener("submit", async event => {
    event.preventDefault();
    const button = $("#analyze");
    const focus = $("#focus").value.trim();
    button.disabled = true;
    button.textContent = "Analysing…";
    $("#analysis-error").textContent = "";
    try {
      renderReport(await api("/analyze/performance", {method: "POST", json: focus ? {focus} : {}}));
    } catch (error) {
      $("#analysis-error").textContent = error.status === 429
        ? `Rate limited: try again in ${error.retryAfter} s.` : `The report failed: ${error.message}`;
      if (error.status === 401) handleError(error);
    } finally {
      button.disabled = false;
      button.textContent = "Analyse the last hour";
    }
  });

  function renderReport(report) {
    const severity = $("#report-severity");
    severity.dataset.status = report.severity;
    severity.textContent = report.severity;
    const source = $("#report-source");
    source.dataset.source = report.source;
    source.textContent = report.source === "gemini"
      ? `Written by Gemini (${report.model})${report.cached ? ", cached" : ""} at ${clock(report.generated_at)}`
      : `Rule-based fallback (${FALLBACK_REASONS[report.reason] || report.reason}) at ${clock(report.generated_at)}`;
    $("#report-summary").textContent = report.summary;
    $("#report-findings").replaceChildren(...report.findings.map(finding => el("li", {},
      el("span", {class: "pill", "data-status": finding.severity}, finding.severity), " ",
      el("strong", {}, finding.title),
      `: ${finding.detail}`)));
    $("#report-recommendations").replaceChildren(...report.recommendations.map(text => el("li", {}, text)));
    $("#report-no-recommendations").hidden = report.recommendations.length > 0;
    $("#report").hidden = false;
  }

  // ---- Keys ----
  function askForKey(message) {
    state.awaitingKey = true;
    $("#auth").hidden = false;
    $("#auth-error").textContent = message || "";
    setRefreshState("key-needed", "Waiting for an API key");
    $("#api-key").focus();
  }

  $("#auth-form").addEventListener("submit", async event => {
    event.preventDefault();
    const key = $("#api-key").value.trim();
    if (!key) {
      $("#auth-error").textContent = "Enter a key.";
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("#api-key").value = "";
    state.awaitingKey = false;
    // One read tries the key, so that a wrong one is refused once rather than by every read of a refresh.
    try {
      const thresholds = await api("/metrics/thresholds");
      if (!state.thresholdsDirty) fillThresholds(thresholds);
    } catch (error) {
      handleError(error);
      if (state.awaitingKey) return;
    }
    $("#auth").hidden = true;
    $("#auth-error").textContent = "";
    refresh(true);
  });

  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    askForKey("");
  });

  // ---- Polling ----
  function setRefreshState(name, text) {
    const element = $("#refresh-state");
    element.dataset.state = name;
    element.textContent = text;
    $("#forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
  }

  function showProblem(text) {
    const banner = $("#page-error");
    banner.textContent = text;
    banner.hidden = false;
  }

  function handleError(error) {
    if (!(error instanceof HttpError)) {
      showProblem(`Could not reach the server (${error.message}); retrying.`);
      return;
    }
    if (error.status === 401) {
      if (state.awaitingKey) return;  // one refresh's other reads were refused too
      const had = sessionStorage.getItem(KEY_STORAGE);
      sessionStorage.removeItem(KEY_STORAGE);
      askForKey(had ? "The server refused this key (401 Unauthorized). Check it and enter it again."
                    : "This server requires an API key.");
      return;
    }
    if (error.status === 429) {
      state.retryAt = Math.max(state.retryAt, Date.now() + error.retryAfter * 1000);
      return;
    }
    showProblem(`Could not read ${error.message}`);
  }

  function windowBody() {
    const window = WINDOWS[state.window];
    const end = new Date();
    return {start: new Date(end.getTime() - window.seconds * 1000).toISOString(), end: end.toISOString(),
            bucket: window.bucket};
  }

  async function refresh(everything) {
    if (state.awaitingKey) return;
    if (state.busy) {
      state.again = true;  // asked during a refresh (a click, the window toggle): once more right after it
      return;
    }
    state.busy = true;
    clearTimeout(state.timer);
    try {
      await readAndRender(everything);
    } catch (error) {
      showProblem(`The page failed to show the figures: ${error.message}`);  // and polls on
    } finally {
      state.busy = false;
    }
    if (state.awaitingKey) return;
    if (state.again) {
      state.again = false;
      refresh(true);
      return;
    }
    if (document.hidden) {
      setRefreshState("paused", "Paused while this tab is hidden");
    } else if (state.retryAt > Date.now()) {
      setRefreshState("limited", `Rate limited: next refresh in ${Math.ceil((state.retryAt - Date.now()) / 1000)} s`);
    } else {
      setRefreshState("live", `Updated ${clock(Date.now())} · every ${REFRESH_MS / 1000} s`);
    }
    schedule();
  }

  async function readAndRender(everything) {
    const slow = everything || state.polls % SLOW_EVERY === 0;
    state.polls += 1;
    $("#page-error").hidden = true;
    const window = state.window;
    const aggregatedBody = windowBody();
    const reads = {
      aggregated: api("/metrics/aggregated", {method: "POST", json: aggregatedBody}),
      stats: api("/batch/stats"), queue: api("/batch/queue/status"), jobs: api("/batch/jobs?limit=10"),
      ...(slow ? {info: api("/"), health: api("/health", {accept: [503]}), cache: api("/cache"),
                  count: api("/metrics/count"), savings: api("/batch/savings"), scheduler: api("/batch/scheduler"),
                  thresholds: api("/metrics/thresholds")} : {}),
    };
    const names = Object.keys(reads);
    const settled = await Promise.allSettled(Object.values(reads));
    const got = {};
    settled.forEach((outcome, index) => {
      if (outcome.status === "fulfilled") got[names[index]] = outcome.value;
      else handleError(outcome.reason);
    });
    // The batch alerts cover every tenant's jobs: read only with an admin key (whose `live` figures are not null).
    if (got.aggregated && got.aggregated.live !== null) {
      try {
        got.alerts = await api("/batch/alerts");
      } catch (error) {
        handleError(error);
      }
    }
    let active = [];
    if (got.stats && ACTIVE_STATUSES.some(s => got.stats.jobs.by_status[s])) {
      try {
        const pages = await Promise.all(ACTIVE_STATUSES.map(s => api(`/batch/jobs?status=${s}&limit=50`)));
        active = pages.flatMap(page => page.items);
      } catch (error) {
        handleError(error);
      }
    }
    if (got.aggregated && window === state.window) {
      $("#serving").dataset.request = JSON.stringify(aggregatedBody);
      renderServing(got.aggregated, window);
      renderLive(got.aggregated.live);
    }
    if (got.aggregated) renderAlerts(got.alerts || null, got.aggregated.breaches);
    if (got.stats && got.queue && got.jobs) renderBatch(got.stats, got.queue, got.jobs.items, active);
    if (got.savings) renderSavings(got.savings);
    if (got.info && got.health && got.cache && got.count && got.scheduler) {
      renderOverview(got.info, got.health, got.cache, got.count, got.scheduler);
    }
    if (got.thresholds && !state.thresholdsDirty) fillThresholds(got.thresholds);
  }

  function schedule() {
    clearTimeout(state.timer);
    if (document.hidden || state.awaitingKey) return;
    state.timer = setTimeout(() => refresh(false), Math.max(REFRESH_MS, state.retryAt - Date.now()));
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(state.timer);
      if (!state.awaitingKey) setRefreshState("paused", "Paused while this tab is hidden");
    } else if (state.retryAt > Date.now()) {
      schedule();
    } else {
      refresh(false);
    }
  });

  $("#refresh-now").addEventListener("click", () => refresh(true));
  $$("[data-window]").forEach(button => button.addEventListener("click", () => {
    state.window = button.dataset.window;
    $$("[data-window]").forEach(b => b.setAttribute("aria-pressed", String(b === button)));
    refresh(false);
  }));

  if (keysRequired && !sessionStorage.getItem(KEY_STORAGE)) {
    askForKey("");
  } else {
    refresh(true);
  }
})();
