// Numbers and values as a person reads them: rounded, with units, never "[object Object]".

// The metric a person compares first, per task; the other scalar metrics follow in their recorded order.
const MAIN_METRICS = {
  classification: ["accuracy", "macro_f1"],
  generation: ["decision_accuracy", "token_f1", "rouge_l", "exact_match"],
};
const METRIC_NAMES = {
  accuracy: "accuracy",
  macro_f1: "macro F1",
  decision_accuracy: "decision accuracy",
  token_f1: "token F1",
  rouge_l: "ROUGE-L",
  exact_match: "exact match",
  no_decision: "no decision",
  rows: "rows",
};

export const percent = (fraction) => `${(100 * fraction).toFixed(1)} %`;
export const score = (value) => value.toFixed(3);

export function metricName(key) {
  return METRIC_NAMES[key] ?? key.replaceAll("_", " ");
}

// A recorded metric: accuracies as %, counts as integers, every other score to 3 places.
export function formatMetric(key, value) {
  if (typeof value !== "number") return formatValue(value);
  if (key.endsWith("accuracy")) return percent(value);
  if (Number.isInteger(value) && !/f1|rouge|precision|recall|exact/.test(key)) return String(value);
  return score(value);
}

// The scalar metrics of an adapter, main one first, as [name, shown] pairs (nested tables are for the detail view).
export function metricSummary(task, metrics) {
  if (!metrics || typeof metrics !== "object") return [];
  const scalar = Object.keys(metrics).filter((k) => typeof metrics[k] === "number");
  const main = (MAIN_METRICS[task] ?? []).filter((k) => scalar.includes(k));
  const ordered = [...main, ...scalar.filter((k) => !main.includes(k) && k !== "rows")];
  if (scalar.includes("rows")) ordered.push("rows");
  return ordered.map((k) => [metricName(k), formatMetric(k, metrics[k])]);
}

// A setting or fact of any JSON type: short numbers, lists joined, objects as "key value" pairs.
export function formatValue(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") return formatNumber(value);
  if (typeof value === "string") return value;
  if (Array.isArray(value)) return value.map(formatValue).join(", ");
  return Object.entries(value).map(([k, v]) => `${k} ${formatValue(v)}`).join(", ");
}

// At most 4 significant digits; tiny values (learning rates) as 3e-4.
export function formatNumber(x) {
  if (!Number.isFinite(x) || Number.isInteger(x)) return String(x);
  if (Math.abs(x) < 1e-3) return x.toExponential(2).replace(/\.?0+e/, "e").replace("e+", "e");
  return String(Number(x.toPrecision(4)));
}

export function formatSeconds(seconds) {
  if (typeof seconds !== "number") return formatValue(seconds);
  return seconds < 120 ? `${seconds.toFixed(1)} s` : `${(seconds / 60).toFixed(1)} min`;
}

export function formatLatency(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const ms = 1000 * seconds;
  if (ms >= 1000) return `${seconds.toFixed(2)} s`;
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${ms.toFixed(0)} ms`;
}

export const formatRate = (perSecond) => (perSecond === null ? "–" : perSecond.toFixed(2));

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

// A new element with its text set as text (never parsed as HTML) and optional attributes.
export function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

export function cell(row, text) {
  const td = row.insertCell();
  td.textContent = text;
  return td;
}
