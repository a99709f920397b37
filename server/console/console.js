// loraswap console: lists the adapters, tries one, uploads new ones. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let adapters = [];  // records from GET /adapters

function cell(row, text) {
  const td = row.insertCell();
  td.textContent = text;
  return td;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
  } catch {
    return text || response.statusText;
  }
}

// Per-adapter request counts and mean latency from the Prometheus text at /metrics.
function parseMetrics(text) {
  const stats = {};
  const line = /^(loraswap_requests_total|loraswap_request_duration_seconds_(?:sum|count))\{([^}]*)\} (\S+)$/;
  for (const row of text.split("\n")) {
    const match = line.exec(row);
    if (!match) continue;
    const adapter = /adapter="([^"]*)"/.exec(match[2])[1];
    const s = (stats[adapter] ??= { requests: 0, sum: 0, count: 0 });
    const value = Number(match[3]);
    if (match[1] === "loraswap_requests_total") s.requests += value;
    else if (match[1].endsWith("_sum")) s.sum += value;
    else s.count += value;
  }
  return stats;
}

async function loadHealth() {
  try {
    const body = await (await fetch("/health")).json();
    $("health").textContent = body.status === "ready" ? `base ${body.base.name} ready` : `base ${body.status}`;
  } catch (err) {
    $("health").textContent = `unreachable: ${err}`;
  }
}

async function loadAdapters() {
  const response = await fetch("/adapters");
  if (!response.ok) {
    $("adapters-error").hidden = false;
    $("adapters-error").textContent = await errorText(response);
    return;
  }
  $("adapters-error").hidden = true;
  const body = await response.json();
  adapters = body.adapters;
  const stats = parseMetrics(await (await fetch("/metrics")).text());
  const tbody = $("adapters").tBodies[0];
  tbody.replaceChildren();
  for (const a of adapters) {
    const row = tbody.insertRow();
    row.dataset.name = a.name;
    cell(row, a.name);
    cell(row, a.task);
    cell(row, a.rank);
    cell(row, a.labels ? a.labels.join(", ") : "");
    cell(row, a.version);
    cell(row, a.loaded ? "yes" : "no");
    cell(row, a.metrics ? Object.entries(a.metrics).map(([k, v]) => `${k}=${v}`).join(", ") : "");
    const s = stats[a.name];
    cell(row, s ? s.requests : 0);
    cell(row, s && s.count ? `${(1000 * s.sum / s.count).toFixed(1)} ms` : "");
  }
  const select = $("try-adapter");
  const chosen = select.value;
  select.replaceChildren(new Option(`${body.base} (base)`, ""));
  for (const a of adapters) {
    const option = new Option(`${a.name} (${a.task})`, a.name);
    option.dataset.task = a.task;
    select.add(option);
  }
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

function showScores(scores) {
  const tbody = $("try-scores").tBodies[0];
  tbody.replaceChildren();
  for (const [label, p] of Object.entries(scores).sort((x, y) => y[1] - x[1])) {
    const row = tbody.insertRow();
    row.dataset.label = label;
    cell(row, label);
    cell(row, `${(100 * p).toFixed(1)} %`);
    const bar = document.createElement("span");
    bar.className = "bar";
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
  const adapter = $("try-adapter").value;
  const task = $("try-adapter").selectedOptions[0]?.dataset.task;
  const output = $("try-output");
  output.textContent = "";
  $("try-scores").hidden = true;
  $("try-status").textContent = "running…";
  const url = adapter ? `/predict?adapter=${encodeURIComponent(adapter)}` : "/predict";
  const body = { inputs: $("try-input").value, stream: true };
  if (task !== "classification") {
    // a classifier takes no generation parameters (the server refuses them)
    body.parameters = {
      max_new_tokens: Number($("try-max-tokens").value),
      temperature: Number($("try-temperature").value),
    };
  }
  const started = performance.now();
  try {
    const response = await fetch(url, {
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
  loadAdapters();
}

// POST /adapters (multipart, bearer token): the three files by name, or one archive.
async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("upload-name").value);
  const archive = $("upload-archive").files[0];
  if (archive) {
    form.append("archive", archive, archive.name);
  } else {
    const files = [
      ["upload-config", "adapter_config.json"],
      ["upload-weights", "adapter_model.safetensors"],
      ["upload-metadata", "loraswap.json"],
    ];
    for (const [id, field] of files) {
      const file = $(id).files[0];
      if (file) form.append(field, file, field);
    }
  }
  if ($("upload-replace").checked) form.append("replace", "true");
  $("upload-status").textContent = "uploading…";
  const response = await fetch("/adapters", {
    method: "POST",
    headers: { Authorization: `Bearer ${$("upload-token").value}` },
    body: form,
  });
  if (response.status === 201) {
    const record = await response.json();
    $("upload-status").textContent = `uploaded ${record.name} v${record.version}`;
    $("upload-form").reset();
    await loadAdapters();
  } else {
    $("upload-status").textContent = `error ${response.status}: ${await errorText(response)}`;
  }
}

$("try-form").addEventListener("submit", tryAdapter);
$("upload-form").addEventListener("submit", upload);
loadHealth();
loadAdapters();
