// The detail view of one adapter: confusion matrix, per-class scores, training settings, data hashes, loss plot.
// Everything comes from the adapter's record and its loraswap.json; every value is set as text.

import { cell, element, formatBytes, formatSeconds, formatValue, metricSummary, score } from "./format.js";

const $ = (id) => document.getElementById(id);
// loraswap.json keys shown elsewhere in the view (or, for the loss curve, drawn in training.png)
const SHOWN_ELSEWHERE = new Set(["task", "labels", "metrics", "data", "hyperparameters", "description",
  "eval_loss_curve", "train_loss_curve", "train_losses", "validation_curve"]);

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

// Classification adapters record these at the top of their metrics, generation ones under `decision`.
function classMetrics(metrics) {
  if (!isObject(metrics)) return {};
  return isObject(metrics.confusion_matrix) || isObject(metrics.per_class) ? metrics : metrics.decision ?? {};
}

function renderConfusion(matrix) {
  const table = $("detail-confusion");
  table.replaceChildren();
  const labels = matrix?.labels;
  const counts = matrix?.rows_gold_columns_predicted;
  const valid = Array.isArray(labels) && Array.isArray(counts) && counts.length === labels.length;
  if (!valid) {
    table.append(element("caption", "no confusion matrix recorded"));
    return;
  }
  const head = table.createTHead().insertRow();
  head.append(element("th", "gold ↓ predicted →", { class: "corner" }));
  for (const label of labels) head.append(element("th", formatValue(label), { scope: "col" }));
  const body = table.createTBody();
  counts.forEach((row, gold) => {
    const tr = body.insertRow();
    tr.append(element("th", formatValue(labels[gold]), { scope: "row" }));
    const total = row.reduce((sum, n) => sum + n, 0);
    row.forEach((count, predicted) => {
      const td = cell(tr, formatValue(count));
      td.dataset.gold = gold;
      td.dataset.predicted = predicted;
      const share = total ? count / total : 0;
      const color = gold === predicted ? "58, 158, 110" : "208, 103, 74";  // green diagonal, red mistakes
      td.style.background = `rgba(${color}, ${(0.08 + 0.6 * share).toFixed(2)})`;
    });
  });
}

function renderPerClass(perClass) {
  const table = $("detail-per-class");
  table.replaceChildren();
  if (!isObject(perClass)) {
    table.append(element("caption", "no per-class scores recorded"));
    return;
  }
  const head = table.createTHead().insertRow();
  for (const name of ["label", "precision", "recall", "F1", "support"]) head.append(element("th", name));
  const body = table.createTBody();
  for (const [label, s] of Object.entries(perClass)) {
    const row = body.insertRow();
    row.dataset.label = label;
    cell(row, label);
    for (const key of ["precision", "recall", "f1"]) cell(row, typeof s?.[key] === "number" ? score(s[key]) : "–");
    cell(row, formatValue(s?.support));
  }
}

function factRow(table, name, value) {
  const row = table.insertRow();
  row.append(element("th", name, { scope: "row" }));
  cell(row, value);
}

function renderSettings(record, metadata) {
  const table = $("detail-settings");
  table.replaceChildren();
  factRow(table, "rank / alpha", `${record.rank} / ${formatValue(record.alpha)}`);
  factRow(table, "target modules", formatValue(record.target_modules));
  factRow(table, "weights", `${formatBytes(record.size_bytes)}, sha256 ${record.sha256}`);
  factRow(table, "version", `${record.version}, created ${record.created}`);
  if (isObject(metadata.hyperparameters)) {
    for (const [key, value] of Object.entries(metadata.hyperparameters)) {
      if (["rank", "alpha", "target_modules"].includes(key)) continue;  // shown above, from the weights
      factRow(table, key.replaceAll("_", " "), formatValue(value));
    }
  }
  for (const [key, value] of Object.entries(metadata)) {
    if (SHOWN_ELSEWHERE.has(key)) continue;
    factRow(table, key.replaceAll("_", " "), key.endsWith("_seconds") ? formatSeconds(value) : formatValue(value));
  }
}

function renderData(data) {
  const table = $("detail-data");
  table.replaceChildren();
  const files = [];
  if (isObject(data)) {
    for (const file of Array.isArray(data.train) ? data.train : []) files.push(["train", file, data.train_rows]);
    if (isObject(data.eval)) files.push(["eval", data.eval, data.eval.rows]);
  }
  if (!files.length) {
    table.append(element("caption", "no data recorded"));
    return;
  }
  const head = table.createTHead().insertRow();
  for (const name of ["split", "file", "rows", "sha256"]) head.append(element("th", name));
  const body = table.createTBody();
  for (const [split, file, rows] of files) {
    const row = body.insertRow();
    cell(row, split);
    cell(row, formatValue(file?.file));
    cell(row, formatValue(rows));
    cell(row, formatValue(file?.sha256)).className = "hash";
  }
}

function renderPlot(record) {
  const image = $("detail-plot");
  image.hidden = true;
  $("detail-plot-missing").hidden = true;
  image.onload = () => { image.hidden = false; };
  image.onerror = () => { $("detail-plot-missing").hidden = false; };
  image.src = `/adapters/${encodeURIComponent(record.name)}/training.png?version=${record.version}`;
}

async function fetchMetadata(name) {
  const response = await fetch(`/adapters/${encodeURIComponent(name)}/metadata`);
  if (response.status === 404) return {};  // an adapter uploaded without loraswap.json
  if (!response.ok) throw new Error(`metadata: ${response.status} ${response.statusText}`);
  const metadata = await response.json();
  return isObject(metadata) ? metadata : {};
}

export async function openDetail(record) {
  const dialog = $("detail");
  dialog.dataset.name = record.name;
  delete dialog.dataset.ready;
  $("detail-title").textContent = `${record.name} · v${record.version} · ${record.task}`;
  $("detail-error").hidden = true;
  if (!dialog.open) dialog.showModal();
  renderPlot(record);
  let metadata = {};
  try {
    metadata = await fetchMetadata(record.name);
  } catch (err) {
    $("detail-error").hidden = false;
    $("detail-error").textContent = String(err.message);
  }
  const description = typeof metadata.description === "string" ? metadata.description : "";
  $("detail-description").textContent = description;
  $("detail-description").hidden = !description;
  const metrics = isObject(metadata.metrics) ? metadata.metrics : record.metrics;
  const perClass = classMetrics(metrics);
  const summary = metricSummary(record.task, metrics);
  if (perClass !== metrics && typeof perClass.macro_f1 === "number") {
    summary.push(["decision macro F1", score(perClass.macro_f1)]);
  }
  $("detail-metrics").textContent = summary.length
    ? summary.map(([name, shown]) => `${name} ${shown}`).join(" · ")
    : "no metrics recorded";
  renderConfusion(perClass.confusion_matrix);
  renderPerClass(perClass.per_class);
  renderSettings(record, metadata);
  renderData(metadata.data);
  dialog.dataset.ready = "true";
}

export function setUpDetail() {
  const dialog = $("detail");
  // a click on the backdrop (outside the dialog's box) closes it
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => { delete dialog.dataset.ready; });
}
