// loraswap console: lists the adapters (a row opens its detail view), shows live traffic, tries an adapter (with
// the same request as a curl command), uploads new ones. Plain browser JavaScript modules, no build step.

import { openDetail, setUpDetail } from "./detail.js";
import { cell, element, formatLatency, metricSummary, percent } from "./format.js";
import { onScrape, scrape, startLivePanel } from "./live.js";

const $ = (id) => document.getElementById(id);
let shownAdapters = "";  // the names and versions the table shows
let lastScrape = null;  // the latest /metrics scrape
let baseReady = false;

// An error answer as one line of text, and its problems one by one when it lists them (an adapter refused at
// upload lists every problem; a request FastAPI refused lists every invalid field).
function errorOf(status, text) {
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    return { message: text || `HTTP ${status}`, problems: [] };
  }
  if (Array.isArray(body?.problems)) return { message: String(body.detail), problems: body.problems.map(String) };
  if (Array.isArray(body?.detail)) {
    const problems = body.detail.map((d) => `${(d.loc ?? []).join(".")}: ${d.msg}`);
    return { message: problems.join("; "), problems };
  }
  return { message: typeof body?.detail === "string" ? body.detail : JSON.stringify(body), problems: [] };
}

async function errorText(response) {
  return errorOf(response.status, await response.text()).message;
}

async function loadHealth() {
  try {
    const body = await (await fetch("/health")).json();
    baseReady = body.status === "ready";
    $("health").textContent = body.status === "ready" ? `base ${body.base.name} ready` : `base ${body.status}`;
  } catch (err) {
    $("health").textContent = `unreachable: ${err}`;
  }
}

// ---- adapters table ----------------------------------------------------------------------------------------

function metricsCell(row, adapter) {
  const td = row.insertCell();
  for (const [name, shown] of metricSummary(adapter.task, adapter.metrics)) {
    td.append(element("span", `${name} ${shown}`, { class: "metric" }));
  }
}

function adapterRow(tbody, a) {
  const row = tbody.insertRow();
  row.dataset.name = a.name;
  row.tabIndex = 0;
  row.title = `details of ${a.name}`;
  row.addEventListener("click", () => openDetail(a));
  row.addEventListener("keydown", (event) => { if (event.key === "Enter") openDetail(a); });
  cell(row, a.name).className = "name";
  cell(row, a.dora ? `${a.task} (DoRA)` : a.task);
  cell(row, a.rank);
  cell(row, a.labels ? a.labels.join(", ") : "");
  cell(row, a.version);
  cell(row, "").className = "loaded";
  metricsCell(row, a);
  cell(row, "0").className = "requests";
  cell(row, "").className = "latency";
}

// Rebuilt when an adapter comes, goes or changes version; otherwise only whether each is loaded changes.
async function loadAdapters() {
  const response = await fetch("/adapters");
  if (!response.ok) {
    $("adapters-error").hidden = false;
    $("adapters-error").textContent = await errorText(response);
    return;
  }
  $("adapters-error").hidden = true;
  const body = await response.json();
  const key = body.adapters.map((a) => `${a.name}@${a.version}`).join(" ");
  if (key !== shownAdapters) {
    shownAdapters = key;
    const tbody = $("adapters").tBodies[0];
    tbody.replaceChildren();
    for (const a of body.adapters) adapterRow(tbody, a);
    const select = $("try-adapter");
    const chosen = select.value;
    select.replaceChildren(new Option(`${body.base} (base)`, ""));
    for (const a of body.adapters) {
      const option = new Option(`${a.name} (${a.task})`, a.name);
      option.dataset.task = a.task;
      select.add(option);
    }
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
    showCurl();
    if (lastScrape) showTotals(lastScrape);
  }
  for (const a of body.adapters) {
    const loaded = $("adapters").querySelector(`tr[data-name="${a.name}"] .loaded`);  // gone if a newer call rebuilt
    if (loaded) loaded.textContent = a.loaded ? "yes" : "no";
  }
  showMixtures(body.mixtures ?? []);
}

// The per-request mixtures in memory: combination, then each adapter at its weight.
function showMixtures(mixtures) {
  const items = mixtures.map((m) => {
    const parts = m.adapters.map((a) => `${a.name} v${a.version} × ${a.weight}`).join(" + ");
    const options = [m.density != null ? `density ${m.density}` : "", m.seed != null ? `seed ${m.seed}` : ""];
    const extra = options.filter(Boolean).join(", ");
    return element("li", `${m.combination}: ${parts}${extra ? ` (${extra})` : ""}`, { "data-name": m.name });
  });
  $("mixtures").replaceChildren(...(items.length ? items : [element("li", "none", { class: "muted" })]));
}

// Requests and mean latency since start, from each scrape of /metrics.
function showTotals(metrics) {
  for (const row of $("adapters").tBodies[0].rows) {
    const stats = metrics.adapters[row.dataset.name];
    row.querySelector(".requests").textContent = String(stats?.requests ?? 0);
    row.querySelector(".latency").textContent = stats?.latency.count
      ? formatLatency(stats.latency.sum / stats.latency.count)
      : "";
  }
}

// ---- try ---------------------------------------------------------------------------------------------------

function tryRequest() {
  const adapter = $("try-adapter").value;
  const path = adapter ? `/predict?adapter=${encodeURIComponent(adapter)}` : "/predict";
  const body = { inputs: $("try-input").value, stream: true };
  if ($("try-adapter").selectedOptions[0]?.dataset.task !== "classification") {
    // a classifier takes no generation parameters (the server refuses them)
    body.parameters = {
      max_new_tokens: Number($("try-max-tokens").value),
      temperature: Number($("try-temperature").value),
    };
  }
  return { path, body };
}

const shellQuote = (text) => `'${text.replaceAll("'", "'\\''")}'`;

function showCurl() {
  const { path, body } = tryRequest();
  $("try-curl").textContent = [
    `curl -sN -X POST ${shellQuote(location.origin + path)}`,
    "  -H 'content-type: application/json'",
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join(" \\\n");
}

async function copyCurl() {
  const text = $("try-curl").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("try-copy").textContent = "copied";
  } catch {
    window.getSelection().selectAllChildren($("try-curl"));  // no clipboard access: select it for Ctrl+C
    $("try-copy").textContent = "selected";
  }
  setTimeout(() => { $("try-copy").textContent = "copy"; }, 1500);
}

function showScores(scores) {
  const tbody = $("try-scores").tBodies[0];
  tbody.replaceChildren();
  const ranked = Object.entries(scores).sort((x, y) => y[1] - x[1]);
  for (const [label, p] of ranked) {
    const row = tbody.insertRow();
    row.dataset.label = label;
    if (label === ranked[0][0]) row.className = "top";
    cell(row, label);
    cell(row, percent(p));
    const bar = element("span", null, { class: "bar" });
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    row.insertCell().append(bar);
  }
  $("try-scores").hidden = false;
}

// Reads /predict's server-sent events: `delta` while generating, then `result` (or `error`).
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

async function tryAdapter(event) {
  event.preventDefault();
  const output = $("try-output");
  output.textContent = "";
  $("try-scores").hidden = true;
  $("try-status").textContent = "running…";
  const { path, body } = tryRequest();
  const started = performance.now();
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      $("try-status").textContent = `error ${response.status}: ${await errorText(response)}`;
      return;
    }
    await readEvents(response, (name, data) => {
      if (name === "delta") {
        output.textContent += data.text;
      } else if (name === "result") {
        const [result] = data.outputs;
        const ms = (performance.now() - started).toFixed(0);
        if (data.task === "classification") {
          output.textContent = result.label;
          showScores(result.scores);
          $("try-status").textContent = `${data.task}, ${ms} ms`;
        } else {
          output.textContent = result.generated_text;
          $("try-status").textContent = `${data.task}, ${result.tokens} tokens, ${result.finish_reason}, ${ms} ms`;
        }
      } else if (name === "error") {
        $("try-status").textContent = `error: ${data.detail}`;
      }
    });
  } catch (err) {
    $("try-status").textContent = `error: ${err}`;
  }
  scrape();
}

// ---- upload ------------------------------------------------------------------------------------------------

function showProblems(problems) {
  $("upload-problems").replaceChildren(...problems.map((p) => element("li", p)));
  $("upload-problems").hidden = problems.length === 0;
}

// POST /adapters (multipart, bearer token) with the chosen files under their own names; one archive is sent as
// is. XMLHttpRequest rather than fetch: only it reports upload progress.
function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("upload-name").value);
  for (const file of $("upload-files").files) form.append("files", file, file.name);
  if ($("upload-replace").checked) form.append("replace", "true");
  const progress = $("upload-progress");
  const status = $("upload-status");
  progress.hidden = false;
  progress.value = 0;
  showProblems([]);
  status.textContent = "uploading…";
  $("upload-run").disabled = true;
  const request = new XMLHttpRequest();
  request.open("POST", "/adapters");
  request.setRequestHeader("Authorization", `Bearer ${$("upload-token").value}`);
  request.upload.addEventListener("progress", (e) => {
    if (!e.lengthComputable) return;
    progress.max = e.total;
    progress.value = e.loaded;
    status.textContent = `uploading… ${percent(e.loaded / e.total)}`;
  });
  request.upload.addEventListener("load", () => { status.textContent = "uploaded, checking the adapter…"; });
  request.addEventListener("load", async () => {
    $("upload-run").disabled = false;
    if (request.status === 201) {
      const record = JSON.parse(request.responseText);
      status.textContent = `uploaded ${record.name} v${record.version}`;
      $("upload-form").reset();
      await loadAdapters();
    } else {
      const { message, problems } = errorOf(request.status, request.responseText);
      status.textContent = problems.length
        ? `error ${request.status}: refused, ${problems.length} problem${problems.length > 1 ? "s" : ""} found`
        : `error ${request.status}: ${message}`;
      showProblems(problems);
    }
  });
  request.addEventListener("error", () => {
    $("upload-run").disabled = false;
    status.textContent = "error: the upload did not reach the server";
  });
  request.send(form);
}

// every scrape (every few seconds) also refreshes the table: totals, and which adapters are loaded
onScrape((metrics) => {
  lastScrape = metrics;
  showTotals(metrics);
  if (!baseReady) loadHealth();
  loadAdapters();
});
setUpDetail();
$("try-form").addEventListener("submit", tryAdapter);
$("try-form").addEventListener("input", showCurl);
$("try-form").addEventListener("change", showCurl);
$("try-copy").addEventListener("click", copyCurl);
$("upload-form").addEventListener("submit", upload);
loadHealth();
loadAdapters();
startLivePanel();
