// The live panel: scrapes /metrics every few seconds and shows the traffic of the last moments.

import { barChart, lineChart } from "./charts.js";
import { cell, element, formatLatency, formatRate } from "./format.js";
import { histogramDelta, parseMetrics, quantile } from "./prometheus.js";

export const REFRESH_MS = 2000;
const WINDOW_SECONDS = 30;  // requests/s and p50/p99 are over this much of the recent past
const CHART_SECONDS = 120;
const SMOOTHING_SECONDS = 10;
const BASE_LABEL = "__base__";

const $ = (id) => document.getElementById(id);
const samples = [];  // [{time (s), scrape}], oldest first, the last CHART_SECONDS
const listeners = [];

// `listener(scrape)` runs after every scrape (the adapters table shows the totals).
export function onScrape(listener) {
  listeners.push(listener);
}

function displayName(adapter) {
  return adapter === BASE_LABEL ? "(base)" : adapter;
}

// The oldest sample within the window before the newest, or null with only one sample.
function windowStart(now) {
  const start = samples.find((s) => now.time - s.time <= WINDOW_SECONDS + 0.5);
  return start === now ? null : start;
}

function adapterRows(now, start) {
  const rows = [];
  for (const [name, stats] of Object.entries(now.scrape.adapters)) {
    const before = start?.scrape.adapters[name];
    const recent = start ? histogramDelta(stats.latency, before?.latency) : null;
    rows.push({
      name,
      requests: stats.requests,
      errors: stats.errors,
      rate: start ? (stats.requests - (before?.requests ?? 0)) / (now.time - start.time) : null,
      p50: recent ? quantile(recent, 0.5) : null,
      p99: recent ? quantile(recent, 0.99) : null,
    });
  }
  return rows.sort((a, b) => b.requests - a.requests || a.name.localeCompare(b.name));
}

// Each point: the rate over the SMOOTHING_SECONDS before that sample (one scrape apart is too jumpy to read).
function rateSeries(names) {
  const newest = samples.at(-1).time;
  return names.map((name) => ({
    name: displayName(name),
    points: samples.slice(1).map((s, i) => {
      const previous = samples.slice(0, i + 1).find((p) => s.time - p.time <= SMOOTHING_SECONDS + 0.5) ?? samples[i];
      const delta = (s.scrape.adapters[name]?.requests ?? 0) - (previous.scrape.adapters[name]?.requests ?? 0);
      return [newest - s.time, delta / (s.time - previous.time)];
    }),
  }));
}

function batchBars(histogram) {
  const bounds = [...histogram.buckets.keys()].sort((a, b) => a - b);
  let previousBound = 0;
  let previousCount = 0;
  return bounds.map((bound) => {
    const count = histogram.buckets.get(bound);
    let label = bound === Infinity ? `>${previousBound}` : String(bound);
    if (bound !== Infinity && bound - previousBound > 1) label = `${previousBound + 1}–${bound}`;
    const bar = { label, value: count - previousCount };
    previousBound = bound;
    previousCount = count;
    return bar;
  });
}

function render(now) {
  const start = windowStart(now);
  const rows = adapterRows(now, start);
  const tbody = $("live-adapters").tBodies[0];
  tbody.replaceChildren();
  if (!rows.length) {
    tbody.insertRow().append(element("td", "no requests yet", { colspan: 6, class: "muted" }));
  }
  for (const r of rows) {
    const row = tbody.insertRow();
    row.dataset.adapter = r.name;
    cell(row, displayName(r.name));
    cell(row, formatRate(r.rate));
    cell(row, formatLatency(r.p50));
    cell(row, formatLatency(r.p99));
    cell(row, String(r.requests));
    cell(row, String(r.errors));
  }
  const total = start ? rows.reduce((sum, r) => sum + r.rate, 0) : null;
  $("live-rate").textContent = formatRate(total);
  $("live-loaded").textContent = now.scrape.loaded ?? "–";
  $("live-queue").textContent = now.scrape.queue ?? "–";
  $("live-merged").textContent = now.scrape.merged ?? "none";
  $("live-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  const busiest = rows.slice(0, 8).map((r) => r.name);
  lineChart($("live-rate-chart"), rateSeries(busiest), CHART_SECONDS, "req/s");
  barChart($("live-batch-chart"), batchBars(now.scrape.batch), "calls");
}

// One scrape now (after a request of our own, without waiting for the next tick).
export async function scrape() {
  try {
    const response = await fetch("/metrics");
    if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
    const now = { time: performance.now() / 1000, scrape: parseMetrics(await response.text()) };
    samples.push(now);
    while (now.time - samples[0].time > CHART_SECONDS) samples.shift();
    render(now);
    for (const listener of listeners) listener(now.scrape);
  } catch (err) {
    $("live-updated").textContent = `not updated: ${err.message}`;
  }
}

export function startLivePanel() {
  scrape();
  setInterval(scrape, REFRESH_MS);
}
