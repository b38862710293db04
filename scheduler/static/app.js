// Relay dashboard: plain JavaScript, no dependencies. Polls the JSON API under api/ and draws
// everything itself (charts are inline SVG). Routes: #/ (overview) and #/jobs/<id> (one job).
"use strict";

(() => {
  const TOKEN_KEY = "relay.apiToken";
  const ACTIVE = new Set(["queued", "running"]);
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const POLL_ACTIVE_MS = 2000;
  const POLL_IDLE_MS = 5000;
  const POLL_HIDDEN_MS = 15000;
  const HEARTBEAT_S = 2; // worker/registry.py BEAT_S
  const PALETTE = ["#2f6fde", "#e0782b", "#2a9d6f", "#9b51c9", "#c9a227", "#d2487a", "#3aa3b8", "#7a6a58"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---- small helpers --------------------------------------------------------------------------

  /** An element with attributes (class, data-*, on* handlers, properties) and children (text is safe). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function appendAll(el, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  const $ = (sel, root = document) => root.querySelector(sel);

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    if (seconds < 60) return `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
    let m = Math.floor(seconds / 60);
    const sec = Math.floor(seconds % 60);
    const hr = Math.floor(m / 60);
    m %= 60;
    return hr ? `${hr}h${String(m).padStart(2, "0")}m` : `${m}m${String(sec).padStart(2, "0")}s`;
  }

  function fmtClock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  function fmtDateTime(t) {
    const d = new Date(t * 1000);
    return `${d.toLocaleDateString()} ${d.toLocaleTimeString([], { hour12: false })}`;
  }

  function fmtNum(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 10000) return `${(v / 1000).toFixed(0)}k`;
    if (a >= 1000) return `${(v / 1000).toFixed(1)}k`;
    if (a < 0.001) return v.toExponential(1).replace("e-", "e−");
    return String(+v.toPrecision(3));
  }

  /** [min, max] of f over items, without spreading a long array into arguments. */
  function extent(items, f) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const it of items) {
      const v = f(it);
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    return [lo, hi];
  }

  const fmtLoss = (v) => (v === null || v === undefined ? "–" : v.toFixed(4));
  const fmtPct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);

  function progressText(p) {
    return `epoch ${p.epoch.toFixed(2)}/${p.epochs} · step ${p.step}/${p.total_steps} · chunk ${p.chunk}/${p.n_chunks}`;
  }

  /** A progress bar whose fill and text a test (or a person) can read. */
  function progressBar(job, cls) {
    const p = job.progress;
    const pct = Math.max(0, Math.min(1, p.fraction)) * 100;
    const fill = h("div", { class: "bar-fill" });
    fill.style.width = `${pct}%`;
    return h("div", {
      class: `${cls} progress state-${job.state}`, role: "progressbar", "aria-valuemin": 0,
      "aria-valuemax": p.total_steps, "aria-valuenow": p.step,
      dataset: { step: p.step, total: p.total_steps, epoch: p.epoch, fraction: p.fraction },
    }, h("div", { class: "bar" }, fill), h("span", { class: "progress-text" }, progressText(p)));
  }

  function stateBadge(state, id) {
    return h("span", { class: `job-state badge state-${state}`, id }, state);
  }

  /** Stable colours per worker within one page view. */
  const workerColours = new Map();
  function colourOf(worker) {
    if (!workerColours.has(worker)) workerColours.set(worker, PALETTE[workerColours.size % PALETTE.length]);
    return workerColours.get(worker);
  }

  // ---- the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  let clockOffset = 0; // server time minus browser time, from /api/queue's "at"
  const serverNow = () => Date.now() / 1000 + clockOffset;

  async function api(path, method = "GET", body = undefined) {
    const headers = { Accept: "application/json" };
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let r;
    try {
      r = await fetch(path, { method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "the scheduler's API cannot be reached");
    }
    if (!r.ok) {
      let detail = `${r.status} ${r.statusText}`;
      let fields = null;
      try {
        const answer = await r.json();
        if (answer && answer.detail) detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail);
        if (answer && Array.isArray(answer.detail)) fields = answer.detail; // 422: [{loc, msg}, ...]
      } catch (e) { /* not JSON */ }
      const err = new ApiError(r.status, detail);
      err.fields = fields;
      throw err;
    }
    return r.json();
  }

  /** A file from the API as an object URL, sending the token (an <img> or a link cannot). */
  async function apiBlobUrl(path) {
    const token = localStorage.getItem(TOKEN_KEY);
    const r = await fetch(path, { headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store" });
    if (!r.ok) throw new ApiError(r.status, `${r.status} ${r.statusText}`);
    return URL.createObjectURL(await r.blob());
  }

  /** Run a change; on 401 ask for the token once and try again with it. */
  async function withToken(change) {
    try {
      return await change();
    } catch (e) {
      if (e.status !== 401) throw e;
      const saved = await askToken(localStorage.getItem(TOKEN_KEY)
        ? "The saved token was refused. Enter the scheduler's RELAY_API_TOKEN."
        : "This scheduler asks for its API token (RELAY_API_TOKEN) to change jobs.");
      if (!saved) throw new ApiError(401, "no token given: nothing changed");
      return change();
    }
  }

  let pendingAsk = null;

  /** Show the token dialog (once, however many callers ask); resolves true when a token was saved. */
  function askToken(why) {
    if (!pendingAsk) pendingAsk = openTokenDialog(why).finally(() => { pendingAsk = null; });
    return pendingAsk;
  }

  function openTokenDialog(why) {
    const dialog = $("#token-dialog");
    const input = $("#token-input");
    $("#token-why").textContent = why || "The bearer token the scheduler asks for to change jobs (RELAY_API_TOKEN).";
    input.value = localStorage.getItem(TOKEN_KEY) || "";
    $("#token-forget").hidden = !localStorage.getItem(TOKEN_KEY);
    return new Promise((resolve) => {
      const done = (saved) => {
        form.removeEventListener("submit", onSubmit);
        $("#token-cancel").removeEventListener("click", onCancel);
        $("#token-forget").removeEventListener("click", onForget);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) dialog.close();
        showTokenState();
        resolve(saved);
      };
      const form = $("#token-form");
      const onSubmit = (ev) => {
        ev.preventDefault();
        const value = input.value.trim();
        if (value) localStorage.setItem(TOKEN_KEY, value);
        done(Boolean(value));
      };
      const onCancel = (ev) => {
        ev.preventDefault();
        done(false);
      };
      const onForget = () => {
        localStorage.removeItem(TOKEN_KEY);
        done(false);
      };
      form.addEventListener("submit", onSubmit);
      $("#token-cancel").addEventListener("click", onCancel);
      $("#token-forget").addEventListener("click", onForget);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      input.focus();
    });
  }

  function showTokenState() {
    const b = $("#token-button");
    b.textContent = localStorage.getItem(TOKEN_KEY) ? "API token: saved" : "API token";
  }

  function setConn(ok, message) {
    const el = $("#conn");
    el.className = `conn ${ok ? "ok" : "down"}`;
    el.textContent = message;
  }

  // ---- polling and routing ----------------------------------------------------------------------

  let generation = 0; // bumped on every route change: answers for an older view are dropped
  let timer = null;
  let current = null; // {refresh(): Promise<number ms until next>}

  function schedule(ms) {
    clearTimeout(timer);
    if (document.hidden) ms = Math.max(ms, POLL_HIDDEN_MS);
    timer = setTimeout(tick, ms);
  }

  async function tick() {
    const gen = generation;
    let next = POLL_IDLE_MS;
    try {
      next = await current.refresh(gen);
      if (gen === generation) setConn(true, `updated ${new Date().toLocaleTimeString([], { hour12: false })}`);
    } catch (e) {
      if (gen !== generation) return;
      if (e.status === 404 && current.notFound) {
        current.notFound(e);
        return;
      }
      if (e.status === 401) { // this scheduler needs the token for reads too
        setConn(false, "API token needed");
        const saved = await askToken(localStorage.getItem(TOKEN_KEY)
          ? "The saved token was refused. Enter the scheduler's RELAY_API_TOKEN."
          : "This scheduler asks for its API token (RELAY_API_TOKEN) to show jobs.");
        if (gen === generation && saved) schedule(0);
        return; // without a token, wait for one through the "API token" button
      }
      setConn(false, e.status === 0 ? "API unreachable, retrying…" : `error: ${e.message}`);
    }
    if (gen === generation) schedule(next);
  }

  function route() {
    generation += 1;
    clearTimeout(timer);
    const view = $("#view");
    const m = /^#\/jobs\/([A-Za-z0-9-]+)/.exec(location.hash);
    current = m ? jobView(view, decodeURIComponent(m[1])) : location.hash === "#/new" ? newJobView(view) : overview(view);
    tick();
  }

  // ---- new job ----------------------------------------------------------------------------------

  /** A form built from the API's own schema of a job spec (openapi.json): every field with its
   *  default and limits; the API's 422 answers are shown beside the fields they name. */
  function newJobView(root) {
    document.title = "Relay · new job";
    const form = h("form", { id: "new-job", class: "new-job", novalidate: true });
    const message = h("div", { id: "new-job-message", class: "action-message", role: "status" });
    root.replaceChildren(h("a", { class: "back", href: "#/" }, "← all jobs"),
      h("section", { class: "card" }, h("h2", {}, "New job"), form, message));
    let loaded = false;
    const inputs = new Map(); // field -> {input, kind, error}

    function kindOf(p) {
      const t = p.type || (p.anyOf || []).map((a) => a.type).find((x) => x && x !== "null");
      return p.enum ? "enum" : t;
    }

    function fieldFor(name, p, lists) {
      const kind = kindOf(p);
      const id = `field-${name}`;
      let input;
      if (kind === "boolean") {
        input = h("input", { id, name, type: "checkbox", checked: p.default === true });
      } else if (kind === "enum") {
        input = h("select", { id, name }, ...p.enum.map((v) => h("option", { value: v, selected: v === p.default }, v)));
      } else if (kind === "integer" || kind === "number") {
        const num = p.type ? p : (p.anyOf || []).find((a) => a.type === kind) || {};
        input = h("input", { id, name, type: "number", step: kind === "integer" ? 1 : "any",
          min: num.minimum ?? num.exclusiveMinimum, max: num.maximum ?? num.exclusiveMaximum,
          value: p.default ?? "", placeholder: p.default === null || p.default === undefined ? "default" : null });
      } else {
        input = h("input", { id, name, type: "text", spellcheck: "false", autocomplete: "off",
          list: name === "train" || name === "val" ? "list-files" : null,
          placeholder: name === "train" || name === "val" ? "a list file: choose or type a path" : (p.default ?? "")});
      }
      const error = h("div", { class: "field-error bad", id: `error-${name}` });
      inputs.set(name, { input, kind, error });
      const required = (schema.required || []).includes(name);
      return h("div", { class: `field field-${kind}` },
        h("label", { for: id }, name, required ? " *" : ""), input,
        p.description ? h("div", { class: "hint" }, p.description) : null, error);
    }

    let schema = null;
    async function refresh() {
      if (loaded) return 60000;
      const [openapi, datasets] = await Promise.all([api("openapi.json"), api("api/datasets")]);
      schema = openapi.components.schemas.TrainSpec;
      const lists = datasets.lists;
      form.replaceChildren(
        h("datalist", { id: "list-files" }, ...lists.map((l) => h("option", { value: l }))),
        h("p", { class: "muted" }, lists.length
          ? `${lists.length} list files under the data roots (${datasets.roots.join(", ")}).`
          : datasets.roots.length ? `No list files under the data roots (${datasets.roots.join(", ")}).`
            : "No data roots are set (RELAY_DATA_ROOTS): type the list files' paths as the scheduler sees them."),
        h("div", { class: "fields" }, ...Object.entries(schema.properties).filter(([, p]) => !p.readOnly).map(([name, p]) => fieldFor(name, p, lists))),
        h("div", { class: "actions" }, h("button", { id: "submit-job", type: "submit" }, "Submit job")));
      loaded = true;
      return 60000;
    }

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {};
      for (const [name, { input, kind }] of inputs) {
        if (kind === "boolean") body[name] = input.checked;
        else if (input.value.trim() === "") continue; // the API's default
        else if (kind === "integer" || kind === "number") body[name] = Number(input.value);
        else body[name] = input.value.trim();
      }
      for (const { error } of inputs.values()) error.textContent = "";
      message.className = "action-message";
      message.textContent = "submitting…";
      try {
        const job = await withToken(() => api("api/jobs", "POST", body));
        location.hash = `#/jobs/${job.id}`;
      } catch (e) {
        message.className = "action-message bad";
        const general = [];
        for (const d of e.fields || []) {
          const field = d.loc && d.loc[0] === "body" && d.loc.length > 1 ? d.loc[1] : null;
          if (field && inputs.has(field)) inputs.get(field).error.textContent = d.msg;
          else general.push(`${(d.loc || []).join(".")}: ${d.msg}`);
        }
        message.textContent = e.fields ? `not submitted: ${general.join("; ") || "see the fields marked"}` : `not submitted: ${e.message}`;
      }
    });

    return { refresh };
  }

  // ---- overview ---------------------------------------------------------------------------------

  function overview(root) {
    document.title = "Relay";
    const queues = h("div", { id: "queues", class: "queues" });
    const workersBody = h("tbody");
    const workersTitle = h("h2", {}, "Workers");
    const jobsBody = h("tbody");
    const jobsTitle = h("h2", {}, "Jobs");
    root.replaceChildren(
      h("section", { class: "card" }, h("h2", {}, "Queues"), queues),
      h("section", { class: "card" }, workersTitle,
        h("table", { id: "workers", class: "table" },
          h("thead", {}, h("tr", {}, h("th", {}, "worker"), h("th", {}, "queues"), h("th", {}, "doing"),
            h("th", {}, "for"), h("th", {}, "heartbeat"))), workersBody)),
      h("section", { class: "card" }, h("div", { class: "card-head" }, jobsTitle,
        h("a", { id: "new-job-link", class: "button", href: "#/new" }, "New job")),
        h("table", { id: "jobs", class: "table" },
          h("thead", {}, h("tr", {}, h("th", {}, "job"), h("th", {}, "state"), h("th", { class: "wide" }, "progress"),
            h("th", { class: "num" }, "last loss"), h("th", { class: "num" }, "ETA"), h("th", {}, "worker"),
            h("th", {}, "reason"))), jobsBody)),
    );

    async function refresh(gen) {
      const [queue, jobs] = await Promise.all([api("api/queue"), api("api/jobs")]);
      if (gen !== generation) return POLL_IDLE_MS;
      clockOffset = queue.at - Date.now() / 1000;

      queues.replaceChildren(...Object.entries(queue.queues).map(([name, depth]) =>
        h("div", { class: "queue", dataset: { queue: name } },
          h("span", { class: "queue-name" }, name),
          h("span", { class: "queue-depth" }, depth === null ? "unknown" : String(depth)),
          h("span", { class: "muted" }, depth === 1 ? "message waiting" : "messages waiting"))),
        ...(queue.broker_error ? [h("p", { class: "warn", id: "broker-error" }, queue.broker_error)] : []),
        ...(queue.warnings || []).map((w) => h("p", { class: "warn queue-warning", dataset: { queue: w.queue } }, w.message)));

      const lostWorkers = queue.lost_workers || [];
      workersTitle.textContent = `Workers (${queue.workers.length} online${lostWorkers.length ? `, ${lostWorkers.length} lost` : ""})`;
      if (!queue.workers.length) {
        workersBody.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: 5 },
          "No worker online. Start one with ", h("code", {}, "relay worker --queues cpu"), ".")));
      } else {
        workersBody.replaceChildren(...queue.workers.map((w) => {
          const age = queue.at - w.last_seen;
          const doing = w.job
            ? h("span", {}, h("a", { href: `#/jobs/${w.job}` }, w.job), ` ${w.chunk === "eval" ? "evaluation" : `chunk ${w.chunk}`}`)
            : h("span", { class: "muted" }, "idle");
          return h("tr", { class: "worker-row", dataset: { node: w.node } },
            h("td", {}, w.node),
            h("td", {}, (w.queues || []).join(", ")),
            h("td", { class: "worker-doing" }, doing,
              w.problem ? h("div", { class: "warn worker-problem", title: fmtDateTime(w.problem.at) }, w.problem.what) : ""),
            h("td", {}, w.since ? fmtDuration(queue.at - w.since) : ""),
            h("td", { class: age > 2 * HEARTBEAT_S ? "warn" : "" }, `${age.toFixed(1)} s ago`));
        }));
      }
      workersBody.append(...lostWorkers.map((w) => h("tr", { class: "worker-row lost", dataset: { node: w.node } },
        h("td", {}, w.node),
        h("td", {}, (w.queues || []).join(", ")),
        h("td", { class: "worker-doing bad" }, "lost", w.job ? ` (was on ${w.job} ${w.chunk === "eval" ? "evaluation" : `chunk ${w.chunk}`})` : ""),
        h("td", {}, ""),
        h("td", { class: "bad worker-lost-at", title: fmtDateTime(w.lost_at) },
          `no heartbeat since ${fmtClock(w.lost_at)} (${fmtDuration(queue.at - w.lost_at)} ago)`))));

      jobs.sort((a, b) => b.created_at - a.created_at);
      jobsTitle.textContent = `Jobs (${jobs.length})`;
      if (!jobs.length) {
        jobsBody.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: 7 },
          "No jobs yet. Submit one with ", h("code", {}, "relay submit --train … --val …"), ".")));
      } else {
        jobsBody.replaceChildren(...jobs.map((j) => {
          const why = j.reason || (ACTIVE.has(j.state) ? j.last_error : null);
          return h("tr", { class: `job-row state-${j.state}`, dataset: { id: j.id, state: j.state } },
            h("td", {}, h("a", { class: "job-link", href: `#/jobs/${j.id}` }, j.id),
              j.spec.name ? h("span", { class: "muted job-name" }, ` ${j.spec.name}`) : null),
            h("td", {}, stateBadge(j.state)),
            h("td", { class: "wide" }, progressBar(j, "job-progress")),
            h("td", { class: "num job-loss" }, fmtLoss(j.last_loss)),
            h("td", { class: "num job-eta" }, j.eta_s === null ? "–" : fmtDuration(j.eta_s)),
            h("td", { class: "job-worker" }, j.worker || ""),
            h("td", { class: `job-reason${j.state === "failed" ? " bad" : ""}`, title: why || "" }, why || ""));
        }));
      }
      const busy = jobs.some((j) => ACTIVE.has(j.state)) || queue.workers.some((w) => w.job);
      return busy ? POLL_ACTIVE_MS : POLL_IDLE_MS;
    }

    return { refresh };
  }

  // ---- one job ----------------------------------------------------------------------------------

  function jobView(root, id) {
    document.title = `Relay · ${id}`;
    workerColours.clear();
    const metrics = new Map(); // step -> metric record
    let known = 0; // the highest step in `metrics`
    let committed = 0; // the job's committed step at the last poll
    let report = null;
    let lastJob = null;
    let showAllEvents = false;
    let messageState = null; // the job state an action message was about

    const el = {
      head: h("div", { class: "job-head" }),
      progress: h("div", { id: "job-progress-box" }),
      stats: h("div", { class: "stats" }),
      reason: h("div", { id: "job-reason", class: "reason", hidden: true }),
      actions: h("div", { class: "actions" }),
      message: h("div", { id: "action-message", class: "action-message", role: "status" }),
      loss: h("div", { id: "loss-chart", class: "chart" }),
      lr: h("div", { id: "lr-chart", class: "chart small" }),
      ips: h("div", { id: "ips-chart", class: "chart small" }),
      valBox: h("div", { id: "validation-box", hidden: true }),
      valMiou: h("div", { id: "val-miou-chart", class: "chart small" }),
      valAcc: h("div", { id: "val-acc-chart", class: "chart small" }),
      legend: h("div", { class: "legend", id: "worker-legend" }),
      timeline: h("div", { id: "timeline", class: "chart" }),
      chunks: h("tbody"),
      events: h("ol", { id: "events", class: "events" }),
      evaluation: h("div", { id: "evaluation" }, h("p", { class: "muted" }, "Loading…")),
      settings: h("dl", { class: "settings" }),
    };
    const pause = h("button", { id: "pause", type: "button", onclick: () => act("pause") }, "Pause");
    const resume = h("button", { id: "resume", type: "button", onclick: () => act("resume") }, "Resume");
    const cancel = h("button", { id: "cancel", type: "button", class: "danger", onclick: () => act("cancel") }, "Cancel");
    const epochSelect = h("select", { id: "weights-epoch", "aria-label": "epoch of the weights", onchange: () => updateDownload() });
    const download = h("a", { id: "download", class: "button", href: "#", download: "", onclick: downloadWithToken }, "Download weights");
    el.actions.append(pause, resume, cancel, h("span", { class: "spacer" }), download, epochSelect);
    const eventsToggle = h("input", { type: "checkbox", id: "all-events", onchange: (ev) => { showAllEvents = ev.target.checked; if (lastJob) renderEvents(lastJob); } });

    el.valBox.append(h("div", { class: "two" },
      h("div", {}, h("h3", {}, "Validation mean IoU"), el.valMiou),
      h("div", {}, h("h3", {}, "Validation pixel accuracy"), el.valAcc)));
    let validation = [];
    let validationFinal = false; // fetched after the job ended: every validated epoch is in it

    root.replaceChildren(
      h("a", { class: "back", href: "#/" }, "← all jobs"),
      h("section", { class: "card" }, el.head, el.progress, el.stats, el.reason, el.actions, el.message,
        h("details", { class: "settings-box" }, h("summary", {}, "settings"), el.settings)),
      h("section", { class: "card" }, h("h2", {}, "Training"),
        h("h3", {}, "Loss per step"), el.loss, el.legend,
        h("div", { class: "two" },
          h("div", {}, h("h3", {}, "Learning rate"), el.lr),
          h("div", {}, h("h3", {}, "Images per second"), el.ips)),
        el.valBox),
      h("section", { class: "card" }, h("h2", {}, "Chunks"),
        h("p", { class: "muted" }, "Which worker trained each chunk, and when. Red: an attempt that failed or was lost; striped: in progress."),
        el.timeline,
        h("table", { id: "chunks", class: "table compact" },
          h("thead", {}, h("tr", {}, ...["chunk", "steps", "ended", "worker", "attempt", "started", "seconds", "loss", "img/s", "device"]
            .map((t, i) => h("th", { class: i >= 5 && i <= 7 ? "num" : "" }, t)))), el.chunks),
        h("h3", {}, "Events ", h("label", { class: "toggle" }, eventsToggle, " show routine events too")),
        el.events),
      h("section", { class: "card" }, h("h2", {}, "Evaluation"), el.evaluation),
    );

    function updateDownload() {
      const e = epochSelect.value;
      download.href = e ? `api/jobs/${encodeURIComponent(id)}/weights?epoch=${e}` : "#";
      download.setAttribute("download", e ? `weight${e}.pt` : "");
      download.hidden = !e;
      download.textContent = `Download weights (epoch ${e})`;
    }

    /** With a saved token the file comes through fetch (a plain link cannot send the header). */
    async function downloadWithToken(ev) {
      if (!localStorage.getItem(TOKEN_KEY)) return; // the plain link works
      ev.preventDefault();
      try {
        const url = await apiBlobUrl(download.getAttribute("href"));
        const a = h("a", { href: url, download: download.getAttribute("download") });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } catch (e) {
        el.message.className = "action-message bad";
        el.message.textContent = `download failed: ${e.message}`;
      }
    }

    async function act(verb) {
      if (verb === "cancel" && !window.confirm(`Cancel job ${id}? It can be resumed later from its last checkpoint.`)) return;
      el.message.className = "action-message";
      el.message.textContent = `${verb}…`;
      try {
        const job = await withToken(() => api(`api/jobs/${encodeURIComponent(id)}/${verb}`, "POST"));
        el.message.textContent = `${verb}: job is ${job.state}${verb === "pause" ? " (the chunk in progress finishes first)" : ""}`;
        messageState = job.state;
        render(job);
      } catch (e) {
        el.message.className = "action-message bad";
        el.message.textContent = `${verb} refused: ${e.message}`;
      }
      schedule(300);
    }

    async function refresh(gen) {
      const [job, queue] = await Promise.all([api(`api/jobs/${encodeURIComponent(id)}`), api("api/queue")]);
      if (gen !== generation) return POLL_IDLE_MS;
      clockOffset = queue.at - Date.now() / 1000;
      // Steps after the committed one may be retrained (a retried chunk); a rewind redoes more.
      if (job.progress.step < committed) {
        metrics.clear();
        known = 0;
      }
      const complete = known >= job.progress.total_steps && FINAL.has(job.state);
      if (!complete) {
        const since = Math.min(known, job.progress.step);
        const fresh = await api(`api/jobs/${encodeURIComponent(id)}/metrics?since_step=${since}`);
        if (gen !== generation) return POLL_IDLE_MS;
        for (const m of fresh) {
          metrics.set(m.step, m);
          known = Math.max(known, m.step);
        }
      }
      // An epoch's point is written before its chunk commits, so a fetch made once the job has
      // ended holds them all; one made earlier may lack the last (scored after its final step).
      if (job.spec.val_every && !(validationFinal && FINAL.has(job.state))) {
        validation = await api(`api/jobs/${encodeURIComponent(id)}/validation`);
        if (gen !== generation) return POLL_IDLE_MS;
        validationFinal = FINAL.has(job.state);
      }
      committed = job.progress.step;
      if (job.has_report && (!report || report._for !== job.updated_at)) {
        report = await api(`api/jobs/${encodeURIComponent(id)}/report`);
        if (gen !== generation) return POLL_IDLE_MS;
        report._for = job.updated_at;
      }
      render(job, queue);
      return ACTIVE.has(job.state) || job.state === "pausing" ? POLL_ACTIVE_MS : job.state === "paused" ? POLL_IDLE_MS : 10000;
    }

    function notFound(e) {
      root.replaceChildren(h("a", { class: "back", href: "#/" }, "← all jobs"),
        h("section", { class: "card" }, h("h2", {}, "No such job"), h("p", {}, e.message)));
    }

    function render(job, queue) {
      if (lastJob && messageState && job.state !== messageState && !el.message.classList.contains("bad")) {
        el.message.textContent = "";
        messageState = null;
      }
      lastJob = job;
      const p = job.progress;
      el.head.replaceChildren(h("h1", { id: "job-id" }, job.id), stateBadge(job.state, "job-state"));
      if (job.worker) el.head.append(h("span", { class: "muted" }, "on ", h("strong", { id: "job-worker" }, job.worker)));
      el.progress.replaceChildren(progressBar(job, "job-progress"));
      const elapsed = (FINAL.has(job.state) ? job.updated_at : serverNow()) - job.created_at;
      const trainedS = job.history.reduce((a, c) => a + c.seconds, 0);
      el.stats.replaceChildren(...[
        ["last loss", fmtLoss(job.last_loss), "job-loss"],
        ["ETA", job.eta_s === null ? "–" : fmtDuration(job.eta_s), "job-eta"],
        ["epoch", `${p.epoch.toFixed(2)} / ${p.epochs}`, null],
        ["chunks done", `${job.history.length ? new Set(job.history.map((c) => c.chunk)).size : 0} / ${p.n_chunks}`, null],
        ...(ACTIVE.has(job.state) ? [["attempts (this chunk)", String(job.attempts), null]] : []),
        ["training time", fmtDuration(trainedS), null],
        ["since submitted", fmtDuration(elapsed), null],
        ["submitted", fmtDateTime(job.created_at), null],
      ].map(([k, v, vid]) => h("div", { class: "stat" }, h("div", { class: "stat-label" }, k), h("div", { class: "stat-value", id: vid }, v))));
      const why = job.reason || job.last_error;
      el.reason.hidden = !why;
      el.reason.className = `reason ${job.state === "failed" ? "bad" : ""}`;
      el.reason.replaceChildren(why ? h("strong", {}, job.reason ? "reason: " : "last error (retried): ") : "", why || "");

      pause.disabled = !ACTIVE.has(job.state);
      resume.disabled = !["paused", "pausing", "failed", "cancelled"].includes(job.state);
      cancel.disabled = FINAL.has(job.state);
      const first = p.start_epoch || 0;  // a job started from init weights numbers its epochs on from them
      const epochsDone = Math.min(p.epochs, first + Math.floor(p.step / p.steps_per_epoch + 1e-9));
      if (epochSelect.options.length !== epochsDone - first) {
        const keep = epochSelect.value;
        const atLatest = !keep || Number(keep) === first + epochSelect.options.length;
        epochSelect.replaceChildren(...Array.from({ length: epochsDone - first }, (_, i) => h("option", { value: first + i + 1 }, `epoch ${first + i + 1}`)));
        epochSelect.value = atLatest || !keep ? String(epochsDone > first ? epochsDone : "") : keep;
      }
      epochSelect.hidden = epochsDone === first;
      updateDownload();

      el.settings.replaceChildren(...Object.entries(job.spec).flatMap(([k, v]) =>
        [h("dt", {}, k), h("dd", {}, v === null ? "–" : String(v))]));

      renderCharts(job);
      renderTimeline(job, queue);
      renderEvents(job);
      renderEvaluation(job);
    }

    function renderCharts(job) {
      const p = job.progress;
      const points = [...metrics.values()].sort((a, b) => a.step - b.step);
      const spe = p.steps_per_epoch;
      const strips = job.history.map((c) => ({ x0: c.start_step, x1: c.end_step, colour: colourOf(c.worker),
        title: `chunk ${c.chunk}: steps ${c.start_step}–${c.end_step} on ${c.worker} (attempt ${c.attempt})` }));
      const last = points.length ? points[points.length - 1].step : 0;
      if (ACTIVE.has(job.state) && last > p.step) {
        const w = points[points.length - 1].worker;
        strips.push({ x0: p.step, x1: last, colour: colourOf(w), running: true, title: `chunk ${p.chunk} on ${w}: in progress` });
      }
      const tip = (label, fmt) => (m) => `step ${m.step} · epoch ${m.epoch.toFixed(2)} · ${label} ${fmt(m)} · chunk ${m.chunk} on ${m.worker}`;
      lineChart(el.loss, {
        points: points.map((m) => ({ x: m.step, y: m.loss, m })), xMax: p.total_steps, spe, epochs: p.epochs - (p.start_epoch || 0), strips,
        smooth: true, height: 240, label: "loss", tooltip: tip("loss", (m) => m.loss.toFixed(4)), empty: "No step trained yet.",
      });
      lineChart(el.lr, {
        points: points.map((m) => ({ x: m.step, y: m.lr, m })), xMax: p.total_steps, spe, epochs: p.epochs - (p.start_epoch || 0),
        height: 150, label: "lr", tooltip: tip("lr", (m) => fmtNum(m.lr)), empty: "–",
      });
      lineChart(el.ips, {
        points: points.map((m) => ({ x: m.step, y: m.images_per_s, m })), xMax: p.total_steps, spe, epochs: p.epochs - (p.start_epoch || 0),
        smooth: true, zero: true, height: 150, label: "img/s", tooltip: tip("images/s", (m) => m.images_per_s.toFixed(1)), empty: "–",
      });
      el.valBox.hidden = !job.spec.val_every;
      if (job.spec.val_every) {
        const vtip = (label, key) => (v) => `epoch ${v.epoch} · step ${v.step} · ${label} ${v[key].toFixed(4)}`;
        for (const [chart, key, label] of [[el.valMiou, "mean_iou", "mIoU"], [el.valAcc, "pixel_accuracy", "pixel accuracy"]]) {
          lineChart(chart, {
            points: validation.map((v) => ({ x: v.step, y: v[key], m: v })), xMax: p.total_steps, spe,
            epochs: p.epochs - (p.start_epoch || 0), zero: true, height: 150, label,
            tooltip: vtip(label, key), empty: `Scored every ${job.spec.val_every} epoch(s); none yet.`,
          });
        }
      }
      const workers = [...new Set([...job.history.map((c) => c.worker), ...points.map((m) => m.worker)])];
      el.legend.replaceChildren(...(workers.length ? [h("span", { class: "muted" }, "chunks trained by: ")] : []),
        ...workers.map((w) => {
          const sw = h("span", { class: "swatch" });
          sw.style.background = colourOf(w);
          return h("span", { class: "legend-item" }, sw, w);
        }),
        p.epochs > 1 ? h("span", { class: "muted legend-note" }, "dashed lines: epoch boundaries") : null);
    }

    function renderTimeline(job, queue) {
      const items = attempts(job, queue);
      drawTimeline(el.timeline, items);
      el.chunks.replaceChildren(...job.history.map((c) => {
        const started = items.find((it) => it.t0 === c.started_at && it.lane === c.worker);
        const attempt = started ? started.attempt : c.attempt;
        const sw = h("span", { class: "swatch" });
        sw.style.background = colourOf(c.worker);
        const recovered = c.environment && c.environment.recovered;
        return h("tr", { class: "chunk-row", dataset: { chunk: c.chunk, worker: c.worker } },
          h("td", {}, String(c.chunk)), h("td", {}, `${c.start_step}–${c.end_step}`),
          h("td", { title: "why the chunk ended here" }, c.ended || ""), h("td", {}, sw, c.worker), h("td", { class: attempt > 1 ? "warn" : "" }, String(attempt)),
          h("td", {}, fmtClock(c.started_at)),
          h("td", { class: "num" }, recovered ? "recovered" : c.seconds.toFixed(1)),
          h("td", { class: "num" }, recovered ? "–" : c.loss_last.toFixed(4)),
          h("td", { class: "num" }, recovered ? "–" : c.images_per_s.toFixed(1)),
          h("td", {}, (c.environment && c.environment.device) || ""));
      }));
      if (!job.history.length) el.chunks.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: 10 }, "No chunk committed yet.")));
    }

    function renderEvents(job) {
      const routine = /^(enqueued (chunk \d+|evaluation): chunk \d+ committed by |chunk \d+ attempt 1 on )/;
      const bad = /(retryable failure|failed|gave up|corrupt|missing|stopped on|reconciler|attempt ([2-9]|\d\d+) on|continuing from)/;
      const shown = job.events.filter((e) => showAllEvents || !routine.test(e.what));
      const hidden = job.events.length - shown.length;
      el.events.replaceChildren(...shown.map((e) => h("li", {
        class: `event${bad.test(e.what) ? " bad" : ""}${/^succeeded/.test(e.what) ? " good" : ""}`,
      }, h("time", {}, fmtClock(e.at)), " ", e.what)),
      hidden ? h("li", { class: "event muted" }, `${hidden} routine events (hand-offs, first attempts) hidden`) : null);
    }

    function renderEvaluation(job) {
      if (!job.has_report || !report) {
        el.evaluation.replaceChildren(h("p", { class: "muted", id: "no-evaluation" },
          job.state === "failed" || job.state === "cancelled"
            ? `No evaluation: the job is ${job.state}.`
            : "The evaluation (mean IoU, pixel accuracy, per-class IoU and predictions) appears here when training ends."));
        return;
      }
      if (el.evaluation.dataset.for === String(report._for)) return; // unchanged: keep the image and scroll position
      el.evaluation.dataset.for = String(report._for);
      const classes = report.per_class.filter((c) => c.iou !== null).sort((a, b) => b.iou - a.iou);
      const src = `${report.predictions_url.replace(/^\//, "")}?v=${encodeURIComponent(job.updated_at)}`;
      const img = h("img", { id: "predictions", alt: "validation images, ground truth and predictions" });
      if (localStorage.getItem(TOKEN_KEY)) { // reads may need the token, which an <img> cannot send
        apiBlobUrl(src).then((url) => { img.src = url; }, (e) => { img.alt = `prediction picture: ${e.message}`; });
      } else {
        img.src = src;
      }
      el.evaluation.replaceChildren(
        h("div", { class: "stats" },
          h("div", { class: "stat big" }, h("div", { class: "stat-label" }, "mean IoU"), h("div", { class: "stat-value", id: "miou" }, report.mean_iou.toFixed(4))),
          h("div", { class: "stat big" }, h("div", { class: "stat-label" }, "pixel accuracy"), h("div", { class: "stat-value", id: "pixel-accuracy" }, report.pixel_accuracy.toFixed(4))),
          h("div", { class: "stat" }, h("div", { class: "stat-label" }, "classes evaluated"), h("div", { class: "stat-value" }, String(report.classes_evaluated))),
          h("div", { class: "stat" }, h("div", { class: "stat-label" }, "validation images"), h("div", { class: "stat-value" }, String(report.val_samples))),
          h("div", { class: "stat" }, h("div", { class: "stat-label" }, "weights"), h("div", { class: "stat-value" }, report.weights))),
        h("div", { class: "two eval" },
          h("div", {}, h("h3", {}, "Per-class IoU"),
            h("ol", { id: "per-class", class: "per-class" }, ...classes.map((c) => {
              const fill = h("span", { class: "iou-fill" });
              fill.style.width = `${(100 * c.iou).toFixed(1)}%`;
              return h("li", { class: "class-iou", dataset: { id: c.id }, title: `${c.gt_pixels} ground-truth pixels, ${c.pred_pixels} predicted` },
                h("span", { class: "class-name" }, `${c.id} ${c.name}`), h("span", { class: "iou-bar" }, fill),
                h("span", { class: "iou-value" }, c.iou.toFixed(4)));
            }))),
          h("div", {}, h("h3", {}, "Predictions"), img)),
      );
    }

    return { refresh, notFound };
  }

  /** Every attempt of every chunk (and of the evaluation), from the job's events and history.
   *  An attempt starts with the event "chunk K attempt A on W"; it succeeded if a history record
   *  of chunk K by W started after it (and before the next attempt), else it failed, was lost, or
   *  is still running. */
  function attempts(job, queue) {
    const re = /^(?:chunk (\d+)|evaluation) attempt (\d+) on (.+)$/;
    const now = serverNow();
    const starts = [];
    job.events.forEach((e, i) => {
      const m = re.exec(e.what);
      if (m) starts.push({ i, at: e.at, chunk: m[1] === undefined ? null : Number(m[1]), attempt: Number(m[2]), worker: m[3] });
    });
    // Each committed record belongs to the latest attempt of its chunk, on its worker, begun before it.
    const byKey = new Map(); // "chunk|worker" -> indices in starts, oldest first
    starts.forEach((st, k) => {
      const key = `${st.chunk}|${st.worker}`;
      if (!byKey.has(key)) byKey.set(key, []);
      byKey.get(key).push(k);
    });
    const record = new Map(); // index in starts -> history record
    for (const c of job.history) {
      const ks = byKey.get(`${c.chunk}|${c.worker}`) || [];
      for (let j = ks.length - 1; j >= 0; j--) {
        if (starts[ks[j]].at <= c.started_at + 0.5) {
          if (!record.has(ks[j])) record.set(ks[j], c);
          break;
        }
      }
    }
    return starts.map((st, k) => {
      const next = k + 1 < starts.length ? starts[k + 1].i : job.events.length;
      const until = job.events.slice(st.i + 1, next); // what happened before the next attempt began
      const last = k === starts.length - 1;
      const name = st.chunk === null ? "evaluation" : `chunk ${st.chunk}`;
      const base = { lane: st.worker, t0: st.at, label: st.chunk === null ? "eval" : String(st.chunk), attempt: st.attempt };
      if (st.chunk === null) {
        const done = until.find((x) => /^succeeded/.test(x.what));
        const failed = until.find((x) => /retryable failure|failed|stopped on/.test(x.what));
        const running = !done && !failed && last && job.state === "running";
        return { ...base, t1: done ? done.at : failed ? failed.at : running ? now : (until[0] || st).at,
          kind: done ? "eval" : running ? "running eval" : "failed",
          title: `evaluation attempt ${st.attempt} on ${st.worker}${done ? "" : failed ? `: ${failed.what}` : running ? ": in progress" : ""}` };
      }
      const c = record.get(k);
      if (c) {
        const recovered = c.environment && c.environment.recovered;
        return { ...base, t0: c.started_at, t1: c.ended_at, kind: recovered ? "recovered" : "ok",
          title: `${name} (steps ${c.start_step}–${c.end_step}) attempt ${st.attempt} on ${st.worker}: ${recovered ? "committed from its checkpoint, not retrained" : `${c.seconds.toFixed(1)} s, loss ${c.loss_last.toFixed(4)}`}` };
      }
      const busy = queue && queue.workers.some((w) => w.node === st.worker && w.job === job.id && String(w.chunk) === String(st.chunk));
      if (last && job.progress.chunk === st.chunk && (busy || (ACTIVE.has(job.state) && job.worker === st.worker))) {
        return { ...base, t1: now, kind: "running", title: `${name} attempt ${st.attempt} on ${st.worker}: in progress` };
      }
      const why = until.find((x) => /retryable failure|stopped on|reconciler|gave up|failed|corrupt|cancelled/.test(x.what));
      return { ...base, t1: (why || until[0] || st).at, kind: "failed",
        title: `${name} attempt ${st.attempt} on ${st.worker}: ${why ? why.what : "not committed"}` };
    });
  }

  // ---- drawing ----------------------------------------------------------------------------------

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / Math.max(1, count);
    const mag = 10 ** Math.floor(Math.log10(raw));
    const f = raw / mag;
    const step = (f >= 7.5 ? 10 : f >= 3.5 ? 5 : f >= 1.5 ? 2 : 1) * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  /** At most ~2 points per pixel column: the lowest and highest of each, in step order. */
  function decimate(points, px, width) {
    if (points.length <= 2 * width) return points;
    const out = [];
    let col = null;
    let lo = null;
    let hi = null;
    const flush = () => {
      if (lo === null) return;
      if (lo === hi) out.push(lo);
      else if (lo.x < hi.x) out.push(lo, hi);
      else out.push(hi, lo);
    };
    for (const p of points) {
      const c = Math.round(px(p.x));
      if (c !== col) {
        flush();
        col = c;
        lo = hi = p;
      } else {
        if (p.y < lo.y) lo = p;
        if (p.y > hi.y) hi = p;
      }
    }
    flush();
    return out;
  }

  function ema(points) {
    const n = points.length;
    const w = n < 20 ? 0 : Math.min(0.95, 1 - 10 / n);
    let last = 0;
    let debias = 0;
    return points.map((p, i) => {
      last = w * last + (1 - w) * p.y;
      debias = 1 - w ** (i + 1);
      return { x: p.x, y: w ? last / debias : p.y };
    });
  }

  function pathOf(points, px, py) {
    return points.map((p, i) => `${i ? "L" : "M"}${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`).join("");
  }

  function lineChart(el, o) {
    const width = Math.max(280, el.clientWidth || 600);
    const height = o.height || 200;
    const stripH = o.strips ? 8 : 0;
    const m = { l: 52, r: 12, t: 16, b: 22 + (stripH ? stripH + 6 : 0) };
    const pw = width - m.l - m.r;
    const ph = height - m.t - m.b;
    const pts = o.points.filter((p) => isFinite(p.y));
    const xMax = Math.max(1, o.xMax);
    const px = (x) => m.l + (x / xMax) * pw;
    let [yLo, yHi] = pts.length ? extent(pts, (p) => p.y) : [0, 1];
    if (o.zero) yLo = Math.min(0, yLo);
    if (yHi - yLo < 1e-12) { const pad = Math.abs(yHi) * 0.1 || 1; yLo -= pad; yHi += pad; } else { const pad = (yHi - yLo) * 0.06; yHi += pad; if (!o.zero || yLo < 0) yLo -= pad; }
    const py = (y) => m.t + ph - ((y - yLo) / (yHi - yLo)) * ph;
    const root = s("svg", { class: "svg-chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": o.label });

    const grid = s("g", { class: "grid" });
    for (const t of niceTicks(yLo, yHi, Math.max(2, Math.floor(ph / 40)))) {
      grid.append(s("line", { x1: m.l, x2: m.l + pw, y1: py(t), y2: py(t) }),
        s("text", { x: m.l - 6, y: py(t) + 4, "text-anchor": "end", class: "tick" }, fmtNum(t)));
    }
    for (const t of niceTicks(0, xMax, Math.max(2, Math.floor(pw / 80)))) {
      if (t !== Math.round(t) || px(t) > m.l + pw - 40) continue; // the right end is the axis title's
      grid.append(s("text", { x: px(t), y: m.t + ph + 14, "text-anchor": "middle", class: "tick" }, String(t)));
    }
    root.append(grid);

    // Epoch boundaries, labelled where there is room.
    if (o.spe && o.epochs > 1) {
      const gap = px(o.spe) - px(0);
      if (gap >= 3) {
        const every = Math.max(1, Math.ceil(44 / gap));
        const g = s("g", { class: "epochs" });
        for (let e = 1; e < o.epochs; e++) {
          const x = px(e * o.spe);
          g.append(s("line", { x1: x, x2: x, y1: m.t, y2: m.t + ph }));
          if (e % every === 0) g.append(s("text", { x: x + 3, y: m.t - 4, class: "tick" }, `epoch ${e + 1}`));
        }
        if (every === 1 || gap >= 44) g.append(s("text", { x: m.l + 3, y: m.t - 4, class: "tick" }, "epoch 1"));
        root.append(g);
      }
    }

    if (o.strips) {
      const g = s("g", { class: "strips" });
      const y = m.t + ph + 20;
      for (const st of o.strips) {
        const r = s("rect", { x: px(st.x0), y, width: Math.max(1, px(st.x1) - px(st.x0) - 1), height: stripH, fill: st.colour,
          class: st.running ? "running" : "" }, s("title", {}, st.title));
        g.append(r);
      }
      root.append(g);
    }

    root.append(s("line", { class: "axis", x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph }));
    root.append(s("text", { x: m.l + pw, y: m.t + ph + 14, "text-anchor": "end", class: "tick axis-title" }, "step"));
    if (!pts.length) {
      root.append(s("text", { x: m.l + pw / 2, y: m.t + ph / 2, "text-anchor": "middle", class: "empty-text" }, o.empty || "no data"));
      el.replaceChildren(root);
      return;
    }
    const smooth = o.smooth && pts.length >= 20;
    root.append(s("path", { class: smooth ? "line raw" : "line", d: pathOf(decimate(pts, px, pw), px, py) }));
    if (smooth) root.append(s("path", { class: "line smooth", d: pathOf(decimate(ema(pts), px, pw), px, py) }));
    if (pts.length <= 60) {
      const dots = s("g", { class: "dots" });
      for (const p of pts) dots.append(s("circle", { cx: px(p.x), cy: py(p.y), r: 2.2 }));
      root.append(dots);
    }

    // Hover: the nearest step's values.
    const cursor = s("g", { class: "cursor", visibility: "hidden" });
    const vline = s("line", { y1: m.t, y2: m.t + ph });
    const dot = s("circle", { r: 3.5 });
    cursor.append(vline, dot);
    root.append(cursor);
    const tip = h("div", { class: "tooltip", hidden: true });
    const overlay = s("rect", { x: m.l, y: m.t, width: pw, height: ph, class: "overlay" });
    root.append(overlay);
    const show = (step) => {
      let a = 0;
      let b = pts.length - 1;
      while (b - a > 1) { const mid = (a + b) >> 1; if (pts[mid].x < step) a = mid; else b = mid; }
      const p = Math.abs(pts[a].x - step) <= Math.abs(pts[b].x - step) ? pts[a] : pts[b];
      el.hoverStep = p.x;
      vline.setAttribute("x1", px(p.x));
      vline.setAttribute("x2", px(p.x));
      dot.setAttribute("cx", px(p.x));
      dot.setAttribute("cy", py(p.y));
      cursor.setAttribute("visibility", "visible");
      tip.hidden = false;
      tip.textContent = o.tooltip ? o.tooltip(p.m) : `${p.x}: ${p.y}`;
      const left = Math.min(px(p.x) + 10, width - 260);
      tip.style.left = `${Math.max(0, left)}px`;
      tip.style.top = `${m.t}px`;
    };
    overlay.addEventListener("mousemove", (ev) => {
      const box = root.getBoundingClientRect();
      show(((ev.clientX - box.left - m.l) / pw) * xMax);
    });
    overlay.addEventListener("mouseleave", () => {
      el.hoverStep = null;
      cursor.setAttribute("visibility", "hidden");
      tip.hidden = true;
    });
    el.replaceChildren(root, tip);
    if (el.hoverStep !== null && el.hoverStep !== undefined) show(el.hoverStep);
  }

  function drawTimeline(el, items) {
    if (!items.length) {
      el.replaceChildren(h("p", { class: "muted" }, "No chunk has started yet."));
      return;
    }
    const lanes = [...new Set(items.map((i) => i.lane))];
    const width = Math.max(320, el.clientWidth || 600);
    const laneH = 24;
    const m = { l: Math.min(160, 16 + 7 * extent(lanes, (l) => Math.min(l.length, 20))[1]), r: 12, t: 6, b: 22 };
    const height = m.t + m.b + lanes.length * laneH;
    const t0 = extent(items, (i) => i.t0)[0];
    const t1 = Math.max(t0 + 1, extent(items, (i) => i.t1)[1]);
    const pw = width - m.l - m.r;
    const px = (t) => m.l + ((t - t0) / (t1 - t0)) * pw;
    const root = s("svg", { class: "svg-chart timeline", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "chunk timeline" });
    const grid = s("g", { class: "grid" });
    for (const t of niceTicks(0, t1 - t0, Math.max(2, Math.floor(pw / 90)))) {
      grid.append(s("line", { x1: px(t0 + t), x2: px(t0 + t), y1: m.t, y2: height - m.b }),
        s("text", { x: px(t0 + t), y: height - 6, "text-anchor": "middle", class: "tick" }, t === 0 ? fmtClock(t0) : `+${fmtDuration(t)}`));
    }
    root.append(grid);
    lanes.forEach((lane, i) => {
      const y = m.t + i * laneH;
      root.append(s("text", { x: m.l - 8, y: y + laneH / 2 + 4, "text-anchor": "end", class: "lane-label" }, lane.length > 20 ? `${lane.slice(0, 19)}…` : lane));
    });
    for (const it of items) {
      const y = m.t + lanes.indexOf(it.lane) * laneH + 3;
      const x = px(it.t0);
      const w = Math.max(2, px(it.t1) - x - 1);
      const g = s("g", { class: `attempt ${it.kind.replace(" ", "-")}`, dataset: { kind: it.kind } });
      const rect = s("rect", { x, y, width: w, height: laneH - 6, rx: 3 }, s("title", {}, it.title));
      if (it.kind === "ok" || it.kind === "running") rect.setAttribute("fill", colourOf(it.lane));
      g.append(rect);
      if (w >= 8 * it.label.length + 6) g.append(s("text", { x: x + w / 2, y: y + laneH / 2 + 1, "text-anchor": "middle", class: "bar-label" }, it.label));
      root.append(g);
    }
    el.replaceChildren(root);
  }

  // ---- start ------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    showTokenState();
    $("#token-button").addEventListener("click", async () => { if (await askToken()) route(); });
    window.addEventListener("hashchange", route);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => schedule(0), 150); });
    route();
  });
})();
