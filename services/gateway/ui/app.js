// nuclide dashboard: a single page over the gateway's JSON API (see /docs). Plain JavaScript, no build step.
// The token lives in sessionStorage (this tab only) and goes out as "Authorization: Bearer".
// Without a build step or module loader each script is a file the page loads, so this one holds the pages (a
// section each) and the log follower they share; graph.js draws the fusion page's call graph.
"use strict";

const ROOT = location.pathname.replace(/\/ui(\/.*)?$/, "");  // the gateway's base path (behind a proxy too)
const TOKEN_KEY = "nuclide.token";
const POLL_MS = 2000;  // how often an open page refreshes what changes (logs, calls, states)
const STATUSES = ["PENDING", "RUNNING", "DONE", "FAILED", "DEAD"];
const LOG_LINES_KEPT = 2000;  // a page shows at most this many log lines; older ones scroll away
const RECONNECT_MS = [500, 1000, 2000, 5000];  // waits before following logs again after a drop (then the last)
const MISSING_RETRY_MS = 200;  // a first deploy's function exists a moment after the upload: ask for its logs again
let timers = [];  // the current page's refresh timers, cleared when the page changes
let leaving = [];  // what stops when the page changes (open log streams), run by leavePage()

// ----- small helpers ------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const badge = (text) => h("span", {class: `badge ${text}`}, text ?? "-");
const when = (iso) => (iso ? iso.replace("T", " ") : "-");  // milliseconds kept: retries are that close
const ms = (s) => (s === null || s === undefined ? "-" : `${(s * 1000).toFixed(1)} ms`);
const pretty = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 2));

class ApiError extends Error {
  constructor(status, body) {
    const message = body && body.error ? body.error.message : `HTTP ${status}`;
    super(message);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, {body, headers, text} = {}) {
  const resp = await fetch(ROOT + path, {
    method, body,
    headers: {...(headers || {}), Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`},
  });
  if (resp.status === 401) {
    logout("The token was refused: log in again.");
    throw new ApiError(401, null);
  }
  const raw = await resp.text();
  let parsed = raw;
  if (!text && (resp.headers.get("content-type") || "").startsWith("application/json")) {
    try { parsed = JSON.parse(raw); } catch (e) { /* keep the text */ }
  }
  if (!resp.ok) throw new ApiError(resp.status, parsed);
  return parsed;
}

function every(fn, intervalMs = POLL_MS) {
  fn();
  timers.push(setInterval(fn, intervalMs));
}

function onLeave(fn) {
  leaving.push(fn);
}

function leavePage() {
  timers.forEach(clearInterval);
  timers = [];
  leaving.forEach((fn) => fn());
  leaving = [];
}

// ----- following a function's logs ----------------------------------------------------

function lineTime(line) {
  if (!line.startsWith("{")) return null;  // a print, a traceback, a build's output: no stamp
  try {
    const record = JSON.parse(line);
    return record && typeof record.ts === "string" ? record.ts : null;
  } catch (e) {
    return null;
  }
}

// Follows GET /functions/{name}/logs?follow=true, a chunked text/plain response that stays open: onLines(lines)
// gets whole lines as they arrive. After a drop (the gateway restarted, the network blinked) it follows again
// from the last stamped line's time (the server's clock, so a client clock that is off loses nothing) and skips
// the lines of that instant it already gave. stop() aborts the fetch, which closes the stream on the gateway
// too (nuclide_log_followers in /metrics counts the open ones); resume() follows again from where it stopped.
// since() names the first request's start (a duration, on the server's clock); retryMissing asks again while
// the function does not exist yet (a first deploy), otherwise a 404 ends the following.
function followLogs(name, {tail = 200, since = null, retryMissing = false, onLines, onState = () => {}}) {
  const url = `${ROOT}/functions/${encodeURIComponent(name)}/logs`;
  const opened = performance.now();
  let controller = null;
  let generation = 0;  // one loop runs at a time: stop() and resume() start a new generation
  let followed = false;  // a request was answered once: later ones continue from the last line
  let lastTs = null;  // the last stamped line's time
  let atLastTs = [];  // the lines given from that stamped line on: the server sends them again after a drop

  const give = (lines, skip) => {
    const out = [];
    for (const line of lines) {
      const ts = lineTime(line);
      if (skip.length) {
        if (ts !== null && ts !== lastTs) skip.length = 0;  // past the instant already shown
        else {
          const i = skip.indexOf(line);
          if (i >= 0) { skip.splice(i, 1); continue; }
        }
      }
      if (ts !== null && ts !== lastTs) { lastTs = ts; atLastTs = []; }
      if (lastTs !== null && atLastTs.length < LOG_LINES_KEPT) atLastTs.push(line);
      out.push(line);
    }
    if (out.length) onLines(out);
  };

  const wait = (delayMs) => new Promise((resolve) => setTimeout(resolve, delayMs));
  const run = async (gen) => {
    let drops = 0;
    while (gen === generation) {
      const q = new URLSearchParams({follow: "true", tail: String(followed ? 10000 : tail)});
      const from = lastTs || (followed ? `${Math.ceil((performance.now() - opened) / 1000) + 2}s` : since && since());
      if (from) q.set("since", from);
      const skip = followed ? atLastTs.slice() : [];
      controller = new AbortController();
      let missing = false;
      try {
        const resp = await fetch(`${url}?${q}`, {
          signal: controller.signal, cache: "no-store",
          headers: {Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`},
        });
        if (resp.status === 401) {
          logout("The token was refused: log in again.");
          return;
        }
        missing = resp.status === 404;
        if (missing && !retryMissing) {
          onState("stopped: the function is gone");
          return;
        }
        if (resp.ok) {
          followed = true;
          drops = 0;
          onState("following");
          const reader = resp.body.getReader();
          const decoder = new TextDecoder();
          let partial = "";
          for (;;) {
            const {value, done} = await reader.read();
            if (done) break;
            partial += decoder.decode(value, {stream: true});
            const cut = partial.lastIndexOf("\n");
            if (cut >= 0) {
              give(partial.slice(0, cut).split("\n"), skip);
              partial = partial.slice(cut + 1);
            }
          }
          partial += decoder.decode();
          if (partial) give([partial], skip);
        } else if (!missing) {
          onState(`reconnecting: HTTP ${resp.status}`);
        }
      } catch (err) {
        if (gen !== generation) return;  // stopped: the abort is ours
      }
      if (gen !== generation) return;
      if (!missing) onState("reconnecting…");
      await wait(missing ? MISSING_RETRY_MS : RECONNECT_MS[Math.min(drops++, RECONNECT_MS.length - 1)]);
    }
  };
  const stop = () => {
    generation += 1;
    if (controller) controller.abort();
    onState("stopped");
  };
  const resume = () => {
    stop();
    run(generation);
  };
  run(generation);
  return {stop, resume};
}

function show(el) {
  const page = document.getElementById("page");
  page.replaceChildren(el);
  page.hidden = false;
}

function failure(where, err) {
  where.replaceChildren(h("p", {class: "error"}, err.message));
}

// ----- login --------------------------------------------------------------------------

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  leavePage();
  document.getElementById("top").hidden = true;
  document.getElementById("page").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

async function login(event) {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/functions");
  } catch (err) {
    if (err.status !== 401) document.getElementById("login-error").textContent = err.message;
    return;
  }
  document.getElementById("token").value = "";
  route();
}

// ----- functions ----------------------------------------------------------------------

function functionsPage() {
  const list = h("div", {id: "function-list"}, h("p", {class: "muted"}, "Loading…"));
  const fileInput = h("input", {type: "file", id: "zip-file", accept: ".zip,application/zip"});
  const nameInput = h("input", {id: "deploy-name", placeholder: "function name", pattern: "[A-Za-z0-9][A-Za-z0-9_-]*"});
  const result = h("div", {id: "deploy-result", class: "notice"});
  let chosen = null;
  let autoName = true;  // the name field follows the chosen file's name until someone types in it
  nameInput.addEventListener("input", () => { autoName = !nameInput.value; });

  const choose = (file) => {
    chosen = file;
    if (file && autoName) nameInput.value = file.name.replace(/\.zip$/i, "").replace(/[^A-Za-z0-9_-]/g, "-");
    drop.querySelector(".chosen").textContent = file ? `${file.name} (${file.size} bytes)` : "";
  };
  fileInput.addEventListener("change", () => choose(fileInput.files[0] || null));
  // a zip dropped on the zone is deployed at once, under the name in the field (the file's, unless typed)
  const drop = h("div", {id: "dropzone",
    ondragover: (e) => { e.preventDefault(); drop.classList.add("over"); },
    ondragleave: () => drop.classList.remove("over"),
    ondrop: (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer.files[0] || null;
      if (!file) return;
      choose(file);
      if (!button.disabled) deploy();
    },
  }, "Drop a function zip here to deploy it, or pick one: ", fileInput, h("div", {class: "chosen mono"}));

  // The deploy's answer comes once its instances are ready (or it failed); meanwhile the function's log lines
  // from the deploy's start on (its build's output, then its new instances' start) stream into the page.
  const deploy = async (e) => {
    if (e) e.preventDefault();
    const name = nameInput.value.trim();
    if (!chosen || !name) {
      result.replaceChildren(h("p", {class: "error"}, "Choose a zip and a name first."));
      return;
    }
    button.disabled = true;
    const output = h("pre", {id: "build-log"}, "");
    result.replaceChildren(h("p", {id: "deploy-state"}, badge("building"), ` deploying ${name}: building and starting its instances…`),
                           h("label", {}, "Build and start output"), output);
    const started = performance.now();
    const follower = followLogs(name, {
      tail: 10000, retryMissing: true,
      since: () => `${Math.ceil((performance.now() - started) / 1000) + 2}s`,
      onLines: (lines) => {
        output.textContent += lines.join("\n") + "\n";
        output.scrollTop = output.scrollHeight;
      },
    });
    onLeave(follower.stop);
    try {
      const desc = await api("PUT", `/${encodeURIComponent(name)}`,
                             {body: chosen, headers: {"Content-Type": "application/zip"}});
      result.firstChild.replaceWith(h("p", {id: "deploy-state"}, badge(desc.state), ` ${name} version ${desc.version} is ${desc.state}`,
                                      desc.warnings && desc.warnings.length ? h("pre", {}, desc.warnings.join("\n")) : ""));
    } catch (err) {
      const details = err.body && err.body.error && err.body.error.details;
      const tail = details && details.log_tail ? details.log_tail.trimEnd() : "";
      // the failure's own log tail is the server's last word: shown unless the stream already ended with it
      if (tail && !output.textContent.trimEnd().endsWith(tail.split("\n").pop())) output.textContent = tail + "\n";
      result.firstChild.replaceWith(h("p", {id: "deploy-state", class: "error"}, err.message));
    } finally {
      follower.stop();
      if (!output.textContent) output.textContent = "(no output)";
      button.disabled = false;
      refresh();  // a failed version is listed too, with the version that still serves
    }
  };
  const button = h("button", {type: "submit", id: "deploy-button"}, "Deploy");

  const refresh = async () => {
    try {
      const fns = await api("GET", "/functions");
      if (!fns.length) {
        list.replaceChildren(h("p", {class: "muted"}, "No functions yet: deploy one below."));
        return;
      }
      list.replaceChildren(h("table", {},
        h("thead", {}, h("tr", {}, ["name", "state", "replicas", "version", "group", "runtime", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, fns.map((f) => h("tr", {"data-function": f.name},
          h("td", {}, h("a", {href: `#/function/${encodeURIComponent(f.name)}`}, f.name)),
          h("td", {}, badge(f.state)),
          h("td", {}, `${f.replicas.ready}/${f.replicas.desired}`),
          h("td", {}, f.version || "-", f.latest_version !== f.version ? h("span", {class: "muted"}, ` (latest ${f.latest_version}: ${f.latest_version_state})`) : ""),
          h("td", {}, h("span", {class: "mono"}, f.group.id), " ", f.group.tasks.length > 1 ? h("span", {class: "muted"}, `fused: ${f.group.tasks.join(", ")}`) : ""),
          h("td", {}, f.runtime || "-"),
          h("td", {}, h("button", {class: "danger", type: "button", onclick: () => remove(f.name)}, "Delete")),
        )))));
    } catch (err) {
      failure(list, err);
    }
  };
  const remove = async (name) => {
    if (!confirm(`Delete ${name} and stop its instances?`)) return;
    try { await api("DELETE", `/${encodeURIComponent(name)}`); } catch (err) { alert(err.message); }
    refresh();
  };

  every(refresh, 5000);
  return h("div", {},
    h("h1", {}, "Functions"),
    h("div", {class: "card"}, list),
    h("form", {class: "card", id: "deploy-form", onsubmit: deploy},
      h("h2", {}, "Deploy"),
      drop,
      h("div", {class: "inline"}, h("div", {}, h("label", {for: "deploy-name"}, "Name"), nameInput), button),
      result));
}

// ----- one function -------------------------------------------------------------------

function sparkline(values) {
  const w = 300, hgt = 48;
  if (values.length < 2) return h("p", {class: "muted"}, "Not enough calls for a latency line yet.");
  const max = Math.max(...values) || 1;
  const pts = values.map((v, i) => `${(i / (values.length - 1)) * w},${hgt - 4 - (v / max) * (hgt - 8)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts);
  svg.append(line);
  return h("div", {}, svg, h("span", {class: "muted"}, `max ${(max * 1000).toFixed(1)} ms over the last ${values.length} calls`));
}

function parseHeaders(text) {
  const out = {};
  for (const line of text.split("\n")) {
    const i = line.indexOf(":");
    if (i > 0) out[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
  return out;
}

function functionPage(name) {
  const facts = h("div", {id: "function-facts"}, h("p", {class: "muted"}, "Loading…"));
  const logs = h("pre", {id: "function-logs"}, "(no output yet)");
  const logState = h("span", {id: "logs-state", class: "muted"});
  const calls = h("div", {id: "function-calls"});
  const spark = h("div", {id: "function-spark"});
  const follow = h("input", {type: "checkbox", id: "follow-logs", checked: true});
  const method = h("select", {id: "invoke-method"}, ["POST", "GET", "PUT", "PATCH", "DELETE"].map((m) => h("option", {}, m)));
  const subpath = h("input", {id: "invoke-path", placeholder: "/sub/path (optional)"});
  const headers = h("textarea", {id: "invoke-headers", placeholder: "Content-Type: application/json"});
  const body = h("textarea", {id: "invoke-body", placeholder: "request body"});
  const asyncBox = h("input", {type: "checkbox", id: "invoke-async"});
  const response = h("div", {id: "invoke-response"});
  const enc = encodeURIComponent(name);

  const invoke = async (e) => {
    e.preventDefault();
    const hdrs = parseHeaders(headers.value);
    if (asyncBox.checked) hdrs["X-Nuclide-Async"] = "true";
    hdrs.Authorization = `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}`;  // private functions need it
    const sub = subpath.value.trim().replace(/^\/*/, "");
    const started = performance.now();
    response.replaceChildren(h("p", {class: "muted"}, "Calling…"));
    try {
      const resp = await fetch(`${ROOT}/functions/${enc}/invoke${sub ? "/" + sub : ""}`, {
        method: method.value, headers: hdrs,
        body: ["GET", "HEAD"].includes(method.value) ? undefined : body.value,
      });
      const text = await resp.text();
      const took = (performance.now() - started).toFixed(1);
      const shown = [...resp.headers].map(([k, v]) => `${k}: ${v}`).join("\n");
      response.replaceChildren(
        h("p", {}, h("span", {id: "invoke-status", class: `badge ${resp.ok ? "ok" : "error"}`}, resp.status),
          ` in ${took} ms`, resp.headers.get("x-call-id") ? h("span", {class: "muted"}, ` · call ${resp.headers.get("x-call-id")}`) : ""),
        h("label", {}, "Body"), h("pre", {id: "invoke-result"}, text),
        h("label", {}, "Headers"), h("pre", {}, shown));
      refreshCalls();
    } catch (err) {
      failure(response, err);
    }
  };

  const refreshFacts = async () => {
    try {
      const f = await api("GET", `/functions/${enc}`);
      facts.replaceChildren(h("dl", {class: "facts"},
        h("dt", {}, "state"), h("dd", {}, badge(f.state)),
        h("dt", {}, "version"), h("dd", {}, `${f.version || "-"} (latest ${f.latest_version}, ${f.latest_version_state})`),
        h("dt", {}, "replicas"), h("dd", {}, `${f.replicas.ready} ready of ${f.replicas.desired}`),
        h("dt", {}, "group"), h("dd", {}, h("span", {class: "mono"}, f.group.id), ` v${f.group.version}: `, f.group.tasks.map((t) => h("span", {class: "task"}, t))),
        h("dt", {}, "runtime"), h("dd", {}, f.runtime || "-"),
        h("dt", {}, "handler"), h("dd", {class: "mono"}, f.handler || "-"),
        h("dt", {}, "timeout"), h("dd", {}, `${f.timeout_s} s`),
        h("dt", {}, "private"), h("dd", {}, f.private ? "yes: invocations need the token" : "no"),
        h("dt", {}, "updated"), h("dd", {}, when(f.updated_at)),
        f.last_error ? [h("dt", {}, "last error"), h("dd", {}, h("pre", {}, f.last_error))] : [],
        f.warnings.length ? [h("dt", {}, "warnings"), h("dd", {}, f.warnings.join("; "))] : []));
    } catch (err) {
      failure(facts, err);
    }
  };
  let shown = [];
  const showLines = (lines) => {
    const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
    shown = shown.concat(lines).slice(-LOG_LINES_KEPT);
    logs.textContent = shown.join("\n");
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  };
  const follower = followLogs(name, {tail: 200, onLines: showLines, onState: (s) => { logState.textContent = ` ${s}`; }});
  onLeave(follower.stop);
  follow.addEventListener("change", () => (follow.checked ? follower.resume() : follower.stop()));
  const refreshCalls = async () => {
    try {
      const rows = await api("GET", `/calls?function=${enc}&limit=25`);
      spark.replaceChildren(sparkline(rows.filter((c) => c.duration_s !== null).map((c) => c.duration_s).reverse()));
      calls.replaceChildren(rows.length ? callTable(rows) : h("p", {class: "muted"}, "No calls yet."));
    } catch (err) {
      failure(calls, err);
    }
  };

  every(refreshFacts, 5000);
  every(refreshCalls, 5000);
  return h("div", {},
    h("h1", {}, h("a", {href: "#/functions"}, "Functions"), " / ", name),
    h("div", {class: "row"},
      h("div", {class: "card"}, h("h2", {}, "Description"), facts),
      h("form", {class: "card", id: "invoke-form", onsubmit: invoke},
        h("h2", {}, "Invoke"),
        h("div", {class: "inline"}, h("div", {}, h("label", {for: "invoke-method"}, "Method"), method),
          h("div", {style: "flex:1"}, h("label", {for: "invoke-path"}, "Path"), subpath)),
        h("label", {for: "invoke-headers"}, "Headers, one per line"), headers,
        h("label", {for: "invoke-body"}, "Body"), body,
        h("div", {class: "inline"}, h("label", {}, asyncBox, " async (202 and a call id)"),
          h("button", {type: "submit", id: "invoke-button"}, "Send")),
        response)),
    h("div", {class: "card"}, h("h2", {}, "Logs ", h("label", {style: "display:inline"}, follow, " follow"), logState), logs),
    h("div", {class: "card"}, h("h2", {}, "Recent calls"), spark, calls));
}

// ----- calls --------------------------------------------------------------------------

function callTable(rows, onPick) {
  return h("table", {},
    h("thead", {}, h("tr", {}, ["id", "function", "status", "kind", "source", "attempts", "queued", "duration", "error"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.map((c) => h("tr", {"data-call": c.id, class: onPick ? "clickable" : null, onclick: onPick ? () => onPick(c.id) : null},
      h("td", {class: "mono"}, c.id), h("td", {}, c.function), h("td", {}, badge(c.status)), h("td", {}, c.kind),
      h("td", {}, c.source), h("td", {class: "attempts"}, `${c.attempts}/${c.max_attempts}`), h("td", {}, when(c.timings.queued)),
      h("td", {}, ms(c.duration_s)), h("td", {class: "error"}, c.error || "")))));
}

function callsPage() {
  const status = h("select", {id: "calls-status"}, h("option", {value: ""}, "any status"), STATUSES.map((s) => h("option", {value: s}, s)));
  const fn = h("input", {id: "calls-function", placeholder: "function"});
  const list = h("div", {id: "call-list"});
  const detail = h("div", {id: "call-detail"}, h("p", {class: "muted"}, "Pick a call to inspect it."));
  const notice = h("div", {id: "calls-notice", class: "notice"});
  let picked = null;

  const query = () => {
    const q = new URLSearchParams({limit: "100"});
    if (status.value) q.set("status", status.value);
    if (fn.value.trim()) q.set("function", fn.value.trim());
    return q.toString();
  };
  const refresh = async () => {
    try {
      list.replaceChildren(callTable(await api("GET", `/calls?${query()}`), pick));
    } catch (err) {
      failure(list, err);
    }
    if (picked) inspect(picked);
  };
  const pick = (id) => { picked = id; inspect(id); };
  const inspect = async (id) => {
    try {
      const c = await api("GET", `/calls/${encodeURIComponent(id)}`);
      detail.replaceChildren(
        h("dl", {class: "facts"},
          h("dt", {}, "call"), h("dd", {class: "mono"}, c.id),
          h("dt", {}, "status"), h("dd", {id: "call-status"}, badge(c.status)),
          h("dt", {}, "attempts"), h("dd", {id: "call-attempts"}, `${c.attempts}/${c.max_attempts}`),
          h("dt", {}, "finished"), h("dd", {id: "call-finished"}, when(c.timings.finished))),
        c.status === "DEAD" ? h("button", {id: "redrive", type: "button", onclick: () => redrive(c.id)}, "Redrive") : "",
        h("label", {}, "Record"), h("pre", {}, pretty(c)));
    } catch (err) {
      failure(detail, err);
    }
  };
  const redrive = async (id) => {
    try {
      const c = await api("POST", `/calls/${encodeURIComponent(id)}/redrive`);
      notice.replaceChildren(h("span", {id: "redrive-result"}, `Redriven: ${c.id} is ${c.status}, attempt ${c.attempts}/${c.max_attempts}.`));
      refresh();
    } catch (err) {
      notice.replaceChildren(h("p", {class: "error"}, err.message));
    }
  };
  const purge = async () => {
    if (!["DONE", "FAILED", "DEAD"].includes(status.value)) {
      notice.replaceChildren(h("p", {class: "error"}, "Filter by DEAD, FAILED or DONE first: purge deletes the calls of that status."));
      return;
    }
    const who = fn.value.trim();
    if (!confirm(`Delete every ${status.value} call${who ? " of " + who : ""}?`)) return;
    try {
      const q = new URLSearchParams({status: status.value});
      if (who) q.set("function", who);
      const r = await api("DELETE", `/calls?${q}`);
      notice.replaceChildren(`Purged ${r.purged} ${status.value} call(s).`);
      refresh();
    } catch (err) {
      notice.replaceChildren(h("p", {class: "error"}, err.message));
    }
  };
  status.addEventListener("change", refresh);
  fn.addEventListener("change", refresh);

  every(refresh);
  return h("div", {},
    h("h1", {}, "Async calls"),
    h("div", {class: "card inline"},
      h("div", {}, h("label", {for: "calls-status"}, "Status"), status),
      h("div", {}, h("label", {for: "calls-function"}, "Function"), fn),
      h("button", {type: "button", class: "danger", id: "purge", onclick: purge}, "Purge"),
      notice),
    h("div", {class: "row"}, h("div", {class: "card", style: "flex: 2 1 640px"}, list),
      h("div", {class: "card"}, h("h2", {}, "Call"), detail)));
}

// ----- fusion -------------------------------------------------------------------------

function groupCard(g) {
  return h("div", {class: "group", "data-group": g.id},
    h("div", {}, h("span", {class: "mono"}, g.id), " ", badge(g.state)),
    h("div", {}, g.tasks.map((t) => h("span", {class: "task"}, t))),
    h("div", {class: "muted"}, `v${g.version} · ${g.replicas.ready}/${g.replicas.desired} ready`),
    g.error ? h("div", {class: "error", title: g.error}, g.error.length > 160 ? g.error.slice(0, 160) + "…" : g.error) : "");
}

function graphTable(edges) {
  return h("table", {id: "call-graph-table"},
    h("thead", {}, h("tr", {}, ["caller", "callee", "calls", "fused", "remote", "synchronous", "mean"].map((t) => h("th", {}, t)))),
    h("tbody", {}, edges.map((e) => h("tr", {"data-edge": `${e.caller}->${e.callee}`},
      h("td", {}, e.caller), h("td", {}, e.callee), h("td", {class: "calls"}, e.calls), h("td", {class: "fused"}, e.fused),
      h("td", {class: "remote"}, e.remote), h("td", {}, e.sync), h("td", {}, e.mean_ms === null ? "-" : `${e.mean_ms} ms`)))));
}

function fusionPage() {
  const groups = h("div", {id: "groups"});
  const graph = h("div", {id: "call-graph"});
  const optimizer = h("div", {id: "optimizer"});
  const refresh = async () => {
    const groupOf = new Map();
    try {
      const st = await api("GET", "/groups");
      st.groups.forEach((g, i) => g.tasks.forEach((t) => groupOf.set(t, i)));
      const rg = st.regroup;
      groups.replaceChildren(
        h("div", {}, st.groups.length ? st.groups.map(groupCard) : h("p", {class: "muted"}, "No groups: deploy a function.")),
        h("h2", {style: "margin-top:12px"}, "Latest change of setup"),
        rg ? h("div", {}, badge(rg.state), ` #${rg.id}: `, h("span", {class: "mono"}, JSON.stringify(rg.setup)), ` (${when(rg.updated_at)})`,
               rg.error ? h("pre", {}, rg.error + (rg.log_tail ? "\n" + rg.log_tail : "")) : "")
           : h("p", {class: "muted"}, "None yet."));
    } catch (err) {
      failure(groups, err);
    }
    try {
      const o = await api("GET", "/optimizer");
      const minutes = o.graph_window_s ? `${Math.round(o.graph_window_s / 60)} minutes` : "a while";
      graph.replaceChildren(
        !o.graph ? h("p", {class: "muted"}, "The optimizer reports no call graph.")
        : !o.graph.length ? h("p", {class: "muted"}, `No task calls in the last ${minutes}.`)
        : h("div", {},
            h("p", {class: "muted"}, `Task calls (context.call) of the last ${minutes}: boxes are functions, coloured by`,
              " group; solid arrows ran in-process (fused), dashed ones through the gateway (remote)."),
            h("div", {class: "graph-scroll"}, callGraphSvg(o.graph, groupOf)),
            graphTable(o.graph)));
      optimizer.replaceChildren(
        h("dl", {class: "facts"},
          h("dt", {}, "strategy"), h("dd", {}, o.strategy), h("dt", {}, "state"), h("dd", {}, o.state),
          h("dt", {}, "current setup"), h("dd", {class: "mono"}, JSON.stringify(o.current_setup)),
          h("dt", {}, "best setup"), h("dd", {class: "mono"}, o.best_setup ? JSON.stringify(o.best_setup) : "-"),
          h("dt", {}, "best median"), h("dd", {}, o.best_median_ms === null ? "-" : `${o.best_median_ms} ms`)),
        h("h2", {style: "margin-top:12px"}, "Decisions"),
        o.rounds.length ? h("table", {},
          h("thead", {}, h("tr", {}, ["round", "at", "decision", "setup", "reason"].map((t) => h("th", {}, t)))),
          h("tbody", {}, o.rounds.slice().reverse().map((r) => h("tr", {},
            h("td", {}, r.round), h("td", {}, new Date(r.at * 1000).toISOString().replace("T", " ").slice(0, 19)),
            h("td", {}, r.decision), h("td", {class: "mono"}, JSON.stringify(r.setup)), h("td", {}, r.reason)))))
          : h("p", {class: "muted"}, "No decisions yet."));
    } catch (err) {
      optimizer.replaceChildren(h("p", {class: "muted"}, err.message));
      graph.replaceChildren(h("p", {class: "muted"}, err.message));
    }
  };
  every(refresh, 5000);
  return h("div", {},
    h("h1", {}, "Fusion"),
    h("div", {class: "card"}, h("h2", {}, "Groups in force"),
      h("p", {class: "muted"}, "Tasks in one group run in one instance and call each other in-process."), groups),
    h("div", {class: "card"}, h("h2", {}, "Call graph"), graph),
    h("div", {class: "card"}, h("h2", {}, "Optimizer"), optimizer));
}

// ----- runtimes -----------------------------------------------------------------------

function runtimesPage() {
  const list = h("div", {id: "runtime-list"});
  const refresh = async () => {
    try {
      const rts = await api("GET", "/runtimes");
      list.replaceChildren(rts.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["name", "image", "path", "dependencies", "run", "updated"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rts.map((r) => h("tr", {"data-runtime": r.name},
          h("td", {}, r.name), h("td", {class: "mono"}, r.image), h("td", {class: "mono"}, r.path),
          h("td", {class: "mono"}, (r.dependencies || []).join(" ")), h("td", {class: "mono"}, r.run.join(" ")),
          h("td", {}, when(r.updated_at))))))
        : h("p", {class: "muted"}, "No runtimes registered. Functions run on the built-in Python runtime;",
            " register one (an image in the local Docker Engine) with PUT /runtimes/{name}."));
    } catch (err) {
      failure(list, err);
    }
  };
  every(refresh, 10000);
  return h("div", {}, h("h1", {}, "Runtimes"), h("div", {class: "card"}, list));
}

// ----- routing ------------------------------------------------------------------------

function route() {
  leavePage();
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    logout();
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("top").hidden = false;
  const [, page, arg] = (location.hash || "#/functions").split("/");
  for (const a of document.querySelectorAll("nav a[data-page]")) {
    a.classList.toggle("active", a.dataset.page === page || (page === "function" && a.dataset.page === "functions"));
  }
  const pages = {functions: functionsPage, calls: callsPage, fusion: fusionPage, runtimes: runtimesPage};
  if (page === "function" && arg) show(functionPage(decodeURIComponent(arg)));
  else show((pages[page] || functionsPage)());
}

document.getElementById("login-form").addEventListener("submit", login);
document.getElementById("logout").addEventListener("click", () => logout());
window.addEventListener("hashchange", route);
route();
