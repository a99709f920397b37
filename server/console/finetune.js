// loraswap console, fine-tuning: upload a JSONL file, start a job, watch its loss curve live, try the adapter it
// makes. Talks to the OpenAI-compatible /v1/files and /v1/fine_tuning routes. Plain browser JavaScript.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
  let watched = null;  // id of the job whose curve is shown
  let timer = null;

  const auth = () => ({ Authorization: `Bearer ${$("ft-token").value}` });

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      return body.error?.message ?? body.detail ?? text;
    } catch {
      return text || response.statusText;
    }
  }

  async function loadFiles() {
    const body = await (await fetch("/v1/files?purpose=fine-tune")).json();
    for (const id of ["ft-training", "ft-validation"]) {
      const select = $(id);
      const chosen = select.value;
      select.replaceChildren(...(id === "ft-validation" ? [new Option("(none)", "")] : []));
      for (const f of body.data) select.add(new Option(`${f.filename} (${f.id})`, f.id));
      if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
    }
  }

  async function loadJobs() {
    const body = await (await fetch("/v1/fine_tuning/jobs?limit=20")).json();
    const tbody = $("ft-jobs").tBodies[0];
    tbody.replaceChildren();
    for (const job of body.data) {
      const row = tbody.insertRow();
      row.dataset.id = job.id;
      for (const text of [job.id, job.status, job.fine_tuned_model ?? "", job.trained_tokens ?? "",
                          job.error ? job.error.message : ""]) {
        row.insertCell().textContent = text;
      }
      const actions = row.insertCell();
      const watch = document.createElement("button");
      watch.textContent = "watch";
      watch.addEventListener("click", () => watchJob(job.id));
      actions.append(watch);
      if (!FINISHED.has(job.status)) {
        const cancel = document.createElement("button");
        cancel.textContent = "cancel";
        cancel.addEventListener("click", () => cancelJob(job.id));
        actions.append(cancel);
      }
    }
    return body.data;
  }

  // The training loss (and validation loss, if any) per step, as an SVG polyline scaled to the box.
  function drawCurve(points) {
    const svg = $("ft-curve");
    const [width, height, pad] = [600, 200, 24];
    svg.replaceChildren();
    const all = points.train.concat(points.valid);
    if (!all.length) return;
    const maxStep = Math.max(1, ...all.map((p) => p[0]));
    const maxLoss = Math.max(...all.map((p) => p[1]));
    const minLoss = Math.min(0, ...all.map((p) => p[1]));
    const x = (step) => pad + (width - 2 * pad) * step / maxStep;
    const y = (loss) => height - pad - (height - 2 * pad) * (loss - minLoss) / (maxLoss - minLoss || 1);
    for (const [series, colour] of [[points.train, "#4a7bd0"], [points.valid, "#e08a1e"]]) {
      if (!series.length) continue;
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("points", series.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", colour);
      line.dataset.series = series === points.train ? "train" : "valid";
      line.dataset.count = series.length;
      svg.append(line);
    }
  }

  async function refreshWatched() {
    const jobs = await loadJobs();
    if (!watched) return;
    const job = jobs.find((j) => j.id === watched)
      ?? await (await fetch(`/v1/fine_tuning/jobs/${watched}`)).json();
    const events = await (await fetch(`/v1/fine_tuning/jobs/${watched}/events?limit=10000`)).json();
    const points = { train: [], valid: [] };
    const auto = [];
    let figures = null;
    for (const e of events.data.slice().reverse()) {
      if (e.data?.train_loss !== undefined) points.train.push([e.data.step, e.data.train_loss]);
      if (e.data?.valid_loss !== undefined) points.valid.push([e.data.step, e.data.valid_loss]);
      if (e.message.startsWith("Auto ")) auto.push(e.message.slice(5));
      if (e.message.startsWith("Kept the checkpoint") || e.message.startsWith("Validation metrics: ")) {
        figures = e.message;
      }
    }
    drawCurve(points);
    $("ft-auto").replaceChildren(...auto.map((text) => {
      const item = document.createElement("li");
      item.textContent = `auto ${text}`;
      return item;
    }));
    $("ft-validation-figures").textContent = figures ?? "";
    const last = points.train.at(-1);
    $("ft-job-status").textContent = `${job.id}: ${job.status}` +
      (last ? `, step ${last[0]}, training loss ${last[1].toFixed(4)}` : "") +
      (job.error ? ` (${job.error.message})` : "");
    $("ft-try-model").value = job.fine_tuned_model ?? "";
    $("ft-try-run").disabled = !job.fine_tuned_model;
    if (FINISHED.has(job.status)) {
      clearInterval(timer);
      timer = null;
    }
  }

  function watchJob(id) {
    watched = id;
    clearInterval(timer);
    timer = setInterval(refreshWatched, 1000);
    refreshWatched();
  }

  async function cancelJob(id) {
    const response = await fetch(`/v1/fine_tuning/jobs/${id}/cancel`, { method: "POST", headers: auth() });
    $("ft-status").textContent = response.ok ? `cancelled ${id}` : `error ${response.status}: ` +
      await errorMessage(response);
    await loadJobs();
  }

  async function uploadFile(event) {
    event.preventDefault();
    const file = $("ft-file").files[0];
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    $("ft-status").textContent = "uploading…";
    const response = await fetch("/v1/files", { method: "POST", headers: auth(), body: form });
    if (response.ok) {
      const record = await response.json();
      $("ft-status").textContent = `uploaded ${record.filename} as ${record.id}`;
      await loadFiles();
      $("ft-training").value = record.id;
    } else {
      $("ft-status").textContent = `error ${response.status}: ${await errorMessage(response)}`;
    }
  }

  async function startJob(event) {
    event.preventDefault();
    const health = await (await fetch("/health")).json();
    const body = {
      model: health.base.name,
      training_file: $("ft-training").value,
      hyperparameters: {},  // an empty field is "auto": the server chooses from the data and the base
    };
    const fields = [["n_epochs", "ft-epochs"], ["batch_size", "ft-batch"], ["learning_rate_multiplier", "ft-lr"]];
    for (const [key, id] of fields) {
      body.hyperparameters[key] = $(id).value ? Number($(id).value) : "auto";
    }
    if ($("ft-validation").value) body.validation_file = $("ft-validation").value;
    if ($("ft-suffix").value) body.suffix = $("ft-suffix").value;
    const response = await fetch("/v1/fine_tuning/jobs", {
      method: "POST",
      headers: { ...auth(), "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (response.ok) {
      const job = await response.json();
      $("ft-status").textContent = `started ${job.id}`;
      watchJob(job.id);
    } else {
      $("ft-status").textContent = `error ${response.status}: ${await errorMessage(response)}`;
    }
  }

  async function tryModel(event) {
    event.preventDefault();
    const model = $("ft-try-model").value;
    const record = await fetch(`/adapters/${encodeURIComponent(model)}`);
    const body = { inputs: $("ft-try-input").value };
    if (!record.ok || (await record.json()).task !== "classification") {
      body.parameters = { max_new_tokens: 32 };  // a classifier takes no generation parameters
    }
    const response = await fetch(`/predict?adapter=${encodeURIComponent(model)}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      $("ft-try-output").textContent = `error ${response.status}: ${await errorMessage(response)}`;
      return;
    }
    const [result] = (await response.json()).outputs;
    $("ft-try-output").textContent = result.label ?? result.generated_text;
  }

  $("ft-upload-form").addEventListener("submit", uploadFile);
  $("ft-job-form").addEventListener("submit", startJob);
  $("ft-try-form").addEventListener("submit", tryModel);
  loadFiles();
  loadJobs();
})();
