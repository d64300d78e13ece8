// The batchgen web page: a client of the same JSON API as every other client.
// The API key lives in sessionStorage (this tab only). Text from the server is only ever set
// with textContent, never parsed as HTML.
"use strict";

(() => {
  const KEY = "batchgen.key";
  const ENDED = new Set(["completed", "failed", "cancelled", "expired"]);
  const $ = (sel, root = document) => root.querySelector(sel);
  let token = sessionStorage.getItem(KEY);
  let leaving = []; // what to stop when the view changes (streams, timers)
  let shownOnce = null; // {id, secret}: a webhook secret from a submission, shown on its job page once

  // --- talking to the API ---------------------------------------------------------------

  class ApiError extends Error {
    // Native ({error: {code, message, details, request_id}}), OpenAI ({error: {message, type,
    // param, code}}) and DashScope ({code, message, request_id}) errors, shown as they are.
    constructor(status, body, text) {
      const e = body && typeof body === "object" ? (body.error && typeof body.error === "object" ? body.error : body) : {};
      const message = e.message || text || (status ? `HTTP ${status}` : "request failed");
      super(message);
      this.status = status;
      this.code = e.code || e.type || "";
      // A list of problems with the input, or an object of facts (a limit's retry_after).
      this.details = Array.isArray(e.details) ? e.details
        : e.details && typeof e.details === "object"
          ? Object.entries(e.details).map(([loc, value]) => ({loc, message: String(value)}))
          : (e.param ? [{loc: e.param, message}] : []);
      this.requestId = e.request_id || (body && body.request_id) || "";
    }
  }

  async function call(method, path, body, {signal, raw = false} = {}) {
    const headers = {Authorization: `Bearer ${token}`};
    const init = {method, headers, signal};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, null, `cannot reach the server (${err.message})`);
    }
    if (!resp.ok) {
      const text = await resp.text();
      let data = null;
      try { data = JSON.parse(text); } catch (_) { /* not JSON: shown as text */ }
      if (resp.status === 401) forgetKey();
      const error = new ApiError(resp.status, data, text.slice(0, 500));
      error.retryAfter = resp.headers.get("Retry-After") || "";
      throw error;
    }
    return raw ? resp : resp.json();
  }

  // Server-sent events over fetch (EventSource cannot send the Authorization header).
  async function readEvents(resp, onEvent) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
        if (data.length && onEvent(event, data.join("\n")) === false) {
          reader.cancel().catch(() => {});
          return;
        }
      }
    }
  }

  // Follow a stream until onEvent returns false or the view changes; reconnect when it drops.
  // A server busy with streams answers 429: then onRefused reads the state once (a poll) before
  // the next try, and returning false from it ends the following.
  function follow(path, onEvent, onLive = () => {}, onRefused = null) {
    const abort = new AbortController();
    leaving.push(() => abort.abort());
    let stopped = false;
    (async () => {
      while (!abort.signal.aborted && !stopped) {
        try {
          const resp = await call("GET", path, undefined, {signal: abort.signal, raw: true});
          onLive(true);
          await readEvents(resp, (event, data) => {
            if (onEvent(event, data) === false) { stopped = true; return false; }
            return true;
          });
        } catch (err) {
          if (abort.signal.aborted) return;
          onLive(false);
          if (err instanceof ApiError && err.status >= 400 && err.status < 500 && err.status !== 429) {
            fail(err);
            return;
          }
          if (err instanceof ApiError && err.status === 429 && onRefused) {
            try {
              if (await onRefused() === false) stopped = true;
            } catch (pollErr) {
              if (pollErr instanceof ApiError && pollErr.status >= 400 && pollErr.status < 500) { fail(pollErr); return; }
            }
          }
        }
        if (stopped || abort.signal.aborted) break;
        onLive(false);
        await sleep(2000);
      }
      onLive(false);
    })();
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- errors -----------------------------------------------------------------------------

  function showError(err) {
    const box = $("#error");
    const title = err instanceof ApiError
      ? [err.status ? `Error ${err.status}` : "Error", err.code].filter(Boolean).join(" · ")
      : "Error";
    $("#error-title").textContent = title;
    $("#error-message").textContent = err.message || String(err);
    const list = $("#error-details");
    list.replaceChildren();
    for (const d of (err.details || []).slice(0, 20)) {
      const li = document.createElement("li");
      li.textContent = d.loc ? `${d.loc}: ${d.message}` : (d.message || JSON.stringify(d));
      list.append(li);
    }
    if ((err.details || []).length > 20) {
      const li = document.createElement("li");
      li.textContent = `…and ${err.details.length - 20} more`;
      list.append(li);
    }
    if (err.retryAfter && !(err.details || []).some((d) => d.loc === "retry_after")) {
      const li = document.createElement("li");
      li.textContent = `retry after ${err.retryAfter} s`;
      list.append(li);
    }
    $("#error-request").textContent = err.requestId ? `request id: ${err.requestId}` : "";
    box.hidden = false;
    box.scrollIntoView({block: "nearest"});
  }

  function hideError() { $("#error").hidden = true; }

  function fail(err) {
    if (err && err.name === "AbortError") return;
    showError(err);
    if (err instanceof ApiError && err.status === 401) signInView();
  }

  // --- the frame --------------------------------------------------------------------------

  function forgetKey() {
    token = null;
    sessionStorage.removeItem(KEY);
  }

  function mount(id) {
    const view = $("#view");
    view.replaceChildren($(`#${id}`).content.cloneNode(true));
    return view;
  }

  function leave() {
    for (const stop of leaving.splice(0)) stop();
  }

  const ROUTES = [
    [/^#\/jobs\/(job_[0-9A-Za-z]+)$/, (id) => jobView(id), "jobs"],
    [/^#\/submit$/, () => submitView(), "submit"],
    [/^#\/play$/, () => playView(), "play"],
    [/^/, () => jobsView(), "jobs"],
  ];

  function route() {
    leave();
    hideError();
    if (!token) return signInView();
    $("#nav").hidden = false;
    for (const [pattern, view, nav] of ROUTES) {
      const match = location.hash.match(pattern);
      if (match) {
        for (const a of document.querySelectorAll("[data-nav]")) {
          if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
          else a.removeAttribute("aria-current");
        }
        Promise.resolve(view(...match.slice(1))).catch(fail);
        return;
      }
    }
  }

  function signInView() {
    leave();
    $("#nav").hidden = true;
    const root = mount("tpl-signin");
    const form = $("#signin-form", root);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      hideError();
      token = form.key.value.trim();
      try {
        await call("GET", "/v1/models");
        sessionStorage.setItem(KEY, token);
        if (!location.hash || location.hash === "#/") location.hash = "#/jobs"; // routes on hashchange
        else route();
      } catch (err) {
        forgetKey();
        showError(err);
        form.key.select();
      }
    });
    $("#signin-key", root).focus();
  }

  // --- formatting -------------------------------------------------------------------------

  function ago(iso) {
    if (!iso) return "";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 5) return "just now";
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
  const done = (c) => c.succeeded + c.failed + c.cancelled + c.expired;
  const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;

  function countsText(c) {
    const parts = [`${done(c).toLocaleString()} / ${c.total.toLocaleString()} done`];
    if (c.running) parts.push(`${c.running} running`);
    if (c.failed) parts.push(`${c.failed} failed`);
    if (c.cancelled) parts.push(`${c.cancelled} cancelled`);
    if (c.expired) parts.push(`${c.expired} expired`);
    return parts.join(" · ");
  }

  function setStatus(el, status) {
    el.textContent = status;
    el.className = `status ${status}`;
  }

  function setProgress(bar, job) {
    const total = job.counts.total || 1;
    bar.style.width = `${Math.round((100 * done(job.counts)) / total)}%`;
    bar.classList.toggle("done", ENDED.has(job.status));
    const holder = bar.parentElement;
    holder.setAttribute("role", "progressbar");
    holder.setAttribute("aria-valuemin", "0");
    holder.setAttribute("aria-valuemax", String(job.counts.total));
    holder.setAttribute("aria-valuenow", String(done(job.counts)));
  }

  // --- jobs list --------------------------------------------------------------------------

  async function jobsView() {
    const root = mount("tpl-jobs");
    const list = $("#jobs-list", root);
    const more = $("#jobs-more", root);
    const live = $("#jobs-live", root);
    const shown = new Map(); // job id -> {job, el}
    let after = null;

    function render(job) {
      let entry = shown.get(job.id);
      if (!entry) {
        const el = $("#tpl-job-item").content.firstElementChild.cloneNode(true);
        entry = {el, job};
        shown.set(job.id, entry);
        // Newest first: ids are time-ordered.
        const next = [...list.children].find((li) => li.dataset.id < job.id);
        el.dataset.id = job.id;
        list.insertBefore(el, next || null);
      }
      entry.job = job;
      const el = entry.el;
      $(".job-link", el).href = `#/jobs/${job.id}`;
      $(".job-id", el).textContent = job.metadata && job.metadata.name ? `${job.metadata.name} · ${job.id}` : job.id;
      setStatus($(".status", el), job.status);
      setProgress($(".bar", el), job);
      $(".job-model", el).textContent = job.model;
      $(".job-counts", el).textContent = countsText(job.counts);
      $(".job-tokens", el).textContent = plural(job.usage.total_tokens, "token");
      const age = $(".job-age", el);
      age.textContent = ago(job.created_at);
      age.title = when(job.created_at);
      $("#jobs-empty", root).hidden = shown.size > 0;
    }

    async function page() {
      const query = new URLSearchParams({limit: "20"});
      if (after) query.set("after", after);
      const result = await call("GET", `/v1/jobs?${query}`);
      result.data.forEach(render);
      after = result.last_id || after;
      more.hidden = !result.has_more;
      $("#jobs-empty", root).hidden = shown.size > 0;
    }

    more.addEventListener("click", () => page().catch(fail));
    await page();
    follow("/v1/jobs/events", (event, data) => {
      if (event === "progress") render(JSON.parse(data));
    }, (on) => live.classList.toggle("on", on), async () => {
      (await call("GET", "/v1/jobs?limit=20")).data.forEach(render);
    });
    const timer = setInterval(() => {
      for (const {job, el} of shown.values()) $(".job-age", el).textContent = ago(job.created_at);
    }, 10000);
    leaving.push(() => clearInterval(timer));
  }

  // --- one job ----------------------------------------------------------------------------

  async function jobView(id) {
    const root = mount("tpl-job");
    if (shownOnce && shownOnce.id === id) {
      const note = $("#job-webhook-secret", root);
      note.textContent = `Webhook signing secret (shown this once; keep it to verify the events): ${shownOnce.secret}`;
      note.hidden = false;
      shownOnce = null;
    }
    const list = $("#results-list", root);
    const more = $("#results-more", root);
    const filter = $("#results-filter", root);
    const cancel = $("#job-cancel", root);
    const remove = $("#job-delete", root);
    let job = null;
    let loaded = 0;
    let lastId = null;
    let refreshing = null;
    let again = false;

    function renderJob(j) {
      const changed = !job || done(job.counts) !== done(j.counts) || job.counts.running !== j.counts.running;
      job = j;
      $("#job-title", root).textContent = j.metadata && j.metadata.name ? `${j.metadata.name} · ${j.id}` : j.id;
      setStatus($("#job-status", root), j.status);
      setProgress($("#job-bar", root), j);
      $("#job-model", root).textContent = j.model;
      $("#job-counts", root).textContent = countsText(j.counts);
      $("#job-tokens", root).textContent =
        `${j.usage.prompt_tokens.toLocaleString()} in · ${j.usage.completion_tokens.toLocaleString()} out`;
      $("#job-created", root).textContent = when(j.created_at);
      $("#job-ended", root).textContent = j.completed_at ? when(j.completed_at)
        : (j.estimated_completion_at ? `about ${new Date(j.estimated_completion_at).toLocaleTimeString()}` : "—");
      cancel.hidden = ENDED.has(j.status) || j.status === "cancelling";
      remove.hidden = !ENDED.has(j.status);
      $("#job-webhook-row", root).hidden = !j.webhook;
      if (j.webhook) {
        const w = j.webhook;
        $("#job-webhook", root).textContent = `${w.url} · ${w.status}` + (w.attempts ? ` after ${plural(w.attempts, "attempt")}` : "")
          + (w.last_error && w.status !== "delivered" ? ` (${w.last_error})` : "");
      }
      return changed;
    }

    function renderResult(r) {
      const el = $("#tpl-result").content.firstElementChild.cloneNode(true);
      el.classList.add(r.status);
      $(".result-index", el).textContent = `#${r.index}${r.custom_id ? ` · ${r.custom_id}` : ""}`;
      setStatus($(".status", el), r.status);
      let prompt = r.prompt;
      if (prompt == null && r.messages) {
        const users = r.messages.filter((m) => m.role === "user");
        prompt = users.length ? users[users.length - 1].content : "";
      }
      $(".result-prompt", el).textContent = (prompt || "").length > 400 ? `${prompt.slice(0, 400)}…` : prompt || "";
      let shown = r.text || "";
      if (r.scores) {  // a scoring job: each score's log probability and perplexity
        shown = r.scores.map((sc) => `${sc.continuation == null ? "(the prompt)" : JSON.stringify(sc.continuation)}: `
          + `logprob ${sc.logprob.toFixed(4)}, perplexity ${sc.perplexity.toFixed(2)}${sc.is_greedy ? ", greedy" : ""}`).join("\n");
      } else if (r.choices) {  // n or best_of: every sample kept
        shown = r.choices.map((c) => `[${c.index}] ${c.text}`).join("\n");
      } else if (r.logprobs && r.logprobs.content.length) {
        const lps = r.logprobs.content.map((t) => t.logprob);
        shown += `\n(log probability ${lps.reduce((a, b) => a + b, 0).toFixed(4)} over ${lps.length} tokens)`;
      }
      $(".result-text", el).textContent = shown;
      const meta = [];
      if (r.error) meta.push(`${r.error.code}: ${r.error.message}`);
      if (r.finish_reason) meta.push(`finish: ${r.finish_reason}`);
      if (r.completion_tokens != null) meta.push(`${r.prompt_tokens} + ${r.completion_tokens} tokens`);
      $(".result-meta", el).textContent = meta.join(" · ");
      return el;
    }

    async function load({reset = false} = {}) {
      // reset: read again everything shown so far (results arrive in place, in request order).
      const query = new URLSearchParams({limit: String(reset ? Math.min(1000, Math.max(100, loaded)) : 100)});
      if (filter.value) query.set("status", filter.value);
      if (!reset && lastId) query.set("after", lastId);
      const page = await call("GET", `/v1/jobs/${id}/results?${query}`);
      const items = page.data.map(renderResult);
      if (reset) {
        list.replaceChildren(...items);
        loaded = items.length;
      } else {
        list.append(...items);
        loaded += items.length;
      }
      lastId = page.last_id || (reset ? null : lastId);
      more.hidden = !page.has_more;
      $("#results-empty", root).hidden = loaded > 0;
    }

    function refresh() { // at most one read in flight; changes meanwhile cause one more
      if (refreshing) { again = true; return; }
      refreshing = load({reset: true}).catch(fail).finally(() => {
        refreshing = null;
        if (again) { again = false; refresh(); }
      });
    }

    renderJob(await call("GET", `/v1/jobs/${id}`));
    await load({reset: true});

    more.addEventListener("click", () => load().catch(fail));
    filter.addEventListener("change", () => { loaded = 0; lastId = null; refresh(); });
    $("#job-download", root).addEventListener("click", async () => {
      try {
        const query = filter.value ? `?status=${encodeURIComponent(filter.value)}` : "";
        const resp = await call("GET", `/v1/jobs/${id}/results.jsonl${query}`, undefined, {raw: true});
        const url = URL.createObjectURL(await resp.blob());
        const a = document.createElement("a");
        a.href = url;
        a.download = `${id}${filter.value ? `-${filter.value}` : ""}.jsonl`;
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (err) { fail(err); }
    });
    armed(cancel, "Click again to cancel", async () => {
      renderJob(await call("POST", `/v1/jobs/${id}/cancel`));
      refresh();
    });
    armed(remove, "Click again to delete", async () => {
      await call("DELETE", `/v1/jobs/${id}`);
      location.hash = "#/jobs";
    });

    if (!ENDED.has(job.status)) {
      follow(`/v1/jobs/${id}/events`, (event, data) => {
        const body = JSON.parse(data);
        if (body.deleted) { location.hash = "#/jobs"; return false; }
        if (renderJob(body)) refresh();
        return event !== "end";
      }, () => {}, async () => {
        if (renderJob(await call("GET", `/v1/jobs/${id}`))) refresh();
        return !ENDED.has(job.status);
      });
    }
  }

  // A destructive button asks for a second click instead of a dialog.
  function armed(button, confirmText, action) {
    const label = button.textContent;
    let timer = null;
    button.addEventListener("click", async () => {
      if (!timer) {
        button.textContent = confirmText;
        timer = setTimeout(() => { button.textContent = label; timer = null; }, 4000);
        return;
      }
      clearTimeout(timer);
      timer = null;
      button.textContent = label;
      button.disabled = true;
      try { await action(); } catch (err) { fail(err); } finally { button.disabled = false; }
    });
  }

  // --- submit -----------------------------------------------------------------------------

  async function fillModels(select, hint, {chatOnly = false} = {}) {
    const models = (await call("GET", "/v1/models")).data;
    const usable = chatOnly && models.some((m) => m.chat) ? models.filter((m) => m.chat) : models;
    const served = usable.filter((m) => m.workers);
    select.replaceChildren(...usable.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      const workers = m.workers == null ? "" : m.workers ? ` · ${plural(m.workers, "worker")}` : " · no worker";
      option.textContent = `${m.id}${m.chat ? " (chat)" : ""}${workers}`;
      return option;
    }));
    const remembered = sessionStorage.getItem("batchgen.model");
    const pick = usable.find((m) => m.id === remembered) || served[0] || usable[0];
    if (pick) select.value = pick.id;
    const describe = () => {
      const m = usable.find((x) => x.id === select.value);
      sessionStorage.setItem("batchgen.model", select.value);
      if (!hint || !m) return;
      const parts = [m.description, `context ${m.context_length} tokens`];
      if (m.workers === 0) parts.push("no worker serves it now: requests wait in its queue until one starts");
      hint.textContent = parts.filter(Boolean).join(" · ");
    };
    select.addEventListener("change", describe);
    describe();
  }

  function parseJsonl(text, name) {
    const requests = [];
    const problems = [];
    text.split(/\r?\n/).forEach((line, i) => {
      if (!line.trim()) return;
      try {
        const value = JSON.parse(line);
        if (typeof value === "string") requests.push({prompt: value});
        else if (value && typeof value === "object" && !Array.isArray(value)) requests.push(value);
        else problems.push({loc: `${name} line ${i + 1}`, message: "must be a JSON object or string"});
      } catch (err) {
        problems.push({loc: `${name} line ${i + 1}`, message: `not JSON: ${err.message}`});
      }
    });
    if (problems.length) {
      const err = new Error(`${name}: ${plural(problems.length, "line")} could not be read; nothing was sent`);
      err.details = problems;
      throw err;
    }
    return requests;
  }

  async function submitView() {
    const root = mount("tpl-submit");
    const form = $("#submit-form", root);
    const fileHint = $("#submit-file-hint", root);
    let fromFile = null; // {prompts} or {requests} read from the chosen file

    // Submit stays disabled until the model list is in: clicked before, the browser's own check of
    // the empty (required) model list swallowed the click, and nothing happened.
    $("#submit-button", root).disabled = true;
    await fillModels($("#submit-model", root), $("#submit-model-hint", root));
    $("#submit-button", root).disabled = false;

    form.file.addEventListener("change", async () => {
      fromFile = null;
      fileHint.textContent = "";
      const file = form.file.files[0];
      if (!file) return;
      try {
        const text = await file.text();
        if (/\.(jsonl|ndjson)$/i.test(file.name)) {
          fromFile = {requests: parseJsonl(text, file.name)};
          fileHint.textContent = `${plural(fromFile.requests.length, "request")} from ${file.name} (the text box is ignored)`;
        } else {
          fromFile = {prompts: text.split(/\r?\n/).filter((l) => l.trim())};
          fileHint.textContent = `${plural(fromFile.prompts.length, "prompt")} from ${file.name} (the text box is ignored)`;
        }
      } catch (err) {
        form.file.value = "";
        showError(err);
      }
    });

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      hideError();
      const body = {model: form.model.value};
      if (fromFile) Object.assign(body, fromFile);
      else body.prompts = form.prompts.value.split(/\r?\n/).filter((l) => l.trim());
      const system = form.system.value.trim();
      if (system) body.system = system;
      const params = {};
      // Everything filled in is sent: a setting that does not apply to a scoring job is refused by
      // the API with its name, not dropped here.
      if (form.kind.value === "score") body.kind = "score";
      for (const name of ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "top_logprobs",
        "n", "best_of"]) {
        if (form[name].value !== "") params[name] = Number(form[name].value);
      }
      if (form.logprobs.checked) params.logprobs = true;
      const stop = form.stop.value.split(/\r?\n/).filter((s) => s !== "");
      if (stop.length) params.stop = stop;
      if (Object.keys(params).length) body.params = params;
      if (form.priority.value !== "") body.priority = Number(form.priority.value);
      if (form.webhook.value.trim()) body.webhook = {url: form.webhook.value.trim()};
      const button = $("#submit-button", root);
      button.disabled = true;
      try {
        const job = await call("POST", "/v1/jobs", body);
        // The webhook's signing secret comes in this answer only: the job page shows it once.
        if (job.webhook && job.webhook.secret) shownOnce = {id: job.id, secret: job.webhook.secret};
        location.hash = `#/jobs/${job.id}`;
      } catch (err) {
        fail(err);
      } finally {
        button.disabled = false;
      }
    });
  }

  // --- playground -------------------------------------------------------------------------

  async function playView() {
    const root = mount("tpl-play");
    const log = $("#play-log", root);
    const form = $("#play-form", root);
    const input = $("#play-input", root);
    const send = $("#play-send", root);
    const stop = $("#play-stop", root);
    let messages = [];
    let abort = null;

    // Listeners go on at once and a send waits for the model list: an Enter pressed while the list
    // was still on its way used to find no listener and was lost (CI saw it as a flaky test).
    send.disabled = true;  // until the model list is in, as in submitView
    const modelsIn = fillModels($("#play-model", root), null, {chatOnly: true}).finally(() => {
      send.disabled = false;
    });

    function bubble(role, text) {
      const li = document.createElement("li");
      li.className = `msg ${role}`;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = role === "user" ? "You" : $("#play-model", root).value;
      const body = document.createElement("span");
      body.className = "text";
      body.textContent = text;
      li.append(who, body);
      log.append(li);
      li.scrollIntoView({block: "end"});
      return li;
    }

    $("#play-clear", root).addEventListener("click", () => {
      if (abort) abort.abort();
      messages = [];
      log.replaceChildren();
      input.focus();
    });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) {
        ev.preventDefault();
        form.requestSubmit();
      }
    });
    stop.addEventListener("click", () => abort && abort.abort());
    leaving.push(() => abort && abort.abort());

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (abort) return;
      abort = new AbortController();  // taken now: a second Enter while the list loads sends nothing
      await modelsIn.catch(() => {});
      const text = input.value.trim();
      if (!text) {
        abort = null;
        return;
      }
      hideError();
      input.value = "";
      messages.push({role: "user", content: text});
      bubble("user", text);
      const reply = bubble("assistant", "");
      reply.classList.add("streaming");
      const out = $(".text", reply);
      const system = $("#play-system", root).value.trim();
      const body = {
        model: $("#play-model", root).value,
        messages: system ? [{role: "system", content: system}, ...messages] : messages,
        stream: true,
        stream_options: {include_usage: true},
      };
      const temperature = $("#play-temperature", root).value;
      const maxTokens = $("#play-max", root).value;
      if (temperature !== "") body.temperature = Number(temperature);
      if (maxTokens !== "") body.max_tokens = Number(maxTokens);
      send.hidden = true;
      stop.hidden = false;
      let finish = null;
      try {
        const resp = await call("POST", "/v1/chat/completions", body, {signal: abort.signal, raw: true});
        await readEvents(resp, (_event, data) => {
          if (data === "[DONE]") return false;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk, data);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          if (chunk.usage) {
            const usage = document.createElement("span");
            usage.className = "usage";
            usage.textContent = `${chunk.usage.prompt_tokens} + ${chunk.usage.completion_tokens} tokens` +
              (finish ? ` · ${finish}` : "");
            reply.append(usage);
          }
          reply.scrollIntoView({block: "end"});
          return true;
        });
      } catch (err) {
        if (err.name !== "AbortError") {
          fail(err);
          if (!out.textContent) {
            messages.pop(); // nothing came back: the question can be asked again
            reply.remove();
          }
        } else {
          const note = document.createElement("span");
          note.className = "usage";
          note.textContent = "stopped";
          reply.append(note);
        }
      } finally {
        if (out.textContent && reply.isConnected) messages.push({role: "assistant", content: out.textContent});
        reply.classList.remove("streaming");
        abort = null;
        send.hidden = false;
        stop.hidden = true;
        input.focus();
      }
    });
    input.focus();
    await modelsIn;
  }

  // --- start ------------------------------------------------------------------------------

  $("#error-close").addEventListener("click", hideError);
  $("#sign-out").addEventListener("click", () => {
    forgetKey();
    route();
  });
  window.addEventListener("hashchange", route);
  route();
})();
