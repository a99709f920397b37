// Reads the Prometheus text format of /metrics into per-adapter counters and histograms, and estimates quantiles
// from histogram buckets the way Prometheus' histogram_quantile does.

const SAMPLE = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
const UNESCAPE = { "\\\\": "\\", '\\"': '"', "\\n": "\n" };

function parseLabels(text) {
  const labels = {};
  for (const [, name, value] of (text ?? "").matchAll(LABEL)) {
    labels[name] = value.replace(/\\[\\"n]/g, (s) => UNESCAPE[s]);
  }
  return labels;
}

function emptyHistogram() {
  return { count: 0, sum: 0, buckets: new Map() };  // buckets: upper bound -> cumulative count
}

function addToHistogram(histogram, suffix, labels, value) {
  if (suffix === "_count") histogram.count += value;
  else if (suffix === "_sum") histogram.sum += value;
  else if (suffix === "_bucket") {
    const bound = labels.le === "+Inf" ? Infinity : Number(labels.le);
    histogram.buckets.set(bound, (histogram.buckets.get(bound) ?? 0) + value);
  }
}

// One scrape: {adapters: {name: {requests, errors, latency}}, batch, loaded, queue, merged}.
export function parseMetrics(text) {
  const scrape = { adapters: {}, batch: emptyHistogram(), loaded: null, queue: null, merged: null };
  const adapter = (name) => (scrape.adapters[name] ??= { requests: 0, errors: 0, latency: emptyHistogram() });
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const [, name, labelText, valueText] = match;
    const labels = parseLabels(labelText);
    const value = Number(valueText);
    if (name === "loraswap_requests_total") {
      adapter(labels.adapter).requests += value;
      if (!labels.status.startsWith("2")) adapter(labels.adapter).errors += value;
    } else if (name.startsWith("loraswap_request_duration_seconds_")) {
      addToHistogram(adapter(labels.adapter).latency, name.slice("loraswap_request_duration_seconds".length),
        labels, value);
    } else if (name.startsWith("loraswap_batch_size_")) {
      addToHistogram(scrape.batch, name.slice("loraswap_batch_size".length), labels, value);
    } else if (name === "loraswap_loaded_adapters") {
      scrape.loaded = value;
    } else if (name === "loraswap_queue_depth") {
      scrape.queue = value;
    } else if (name === "loraswap_merged_adapter" && value === 1) {
      scrape.merged = labels.adapter;
    }
  }
  return scrape;
}

// Bucket counts of `later` minus those of `earlier` (the observations between two scrapes).
export function histogramDelta(later, earlier) {
  const buckets = new Map();
  for (const [bound, count] of later.buckets) buckets.set(bound, count - (earlier?.buckets.get(bound) ?? 0));
  return { count: later.count - (earlier?.count ?? 0), sum: later.sum - (earlier?.sum ?? 0), buckets };
}

// The q-quantile, interpolated linearly inside its bucket; null without observations. An answer in the +Inf
// bucket is reported as the highest finite bound.
export function quantile(histogram, q) {
  const bounds = [...histogram.buckets.keys()].sort((a, b) => a - b);
  const total = histogram.buckets.get(Infinity) ?? 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const bound of bounds) {
    const cumulative = histogram.buckets.get(bound);
    if (cumulative >= rank) {
      if (bound === Infinity) return lower;
      return lower + ((bound - lower) * (rank - below)) / Math.max(cumulative - below, 1e-12);
    }
    lower = bound;
    below = cumulative;
  }
  return lower;
}
