// Two small charts drawn as plain SVG (no library, no network): lines over time, and bars.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 480;
const HEIGHT = 180;
const MARGIN = { left: 44, right: 12, top: 12, bottom: 24 };
const COLORS = ["#4a7bd0", "#d0674a", "#3a9e6e", "#9a5bc4", "#c49a1f", "#2a9bb0", "#b04a7b", "#6b6b6b"];

function svgNode(tag, attributes = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A round upper bound for an axis: 1, 2 or 5 times a power of ten.
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * power).find((m) => m >= value);
}

function axes(svg, yMax, yLabel) {
  const bottom = HEIGHT - MARGIN.bottom;
  svg.append(
    svgNode("line", { x1: MARGIN.left, y1: MARGIN.top, x2: MARGIN.left, y2: bottom, class: "axis" }),
    svgNode("line", { x1: MARGIN.left, y1: bottom, x2: WIDTH - MARGIN.right, y2: bottom, class: "axis" }),
    svgNode("text", { x: MARGIN.left - 4, y: MARGIN.top + 4, "text-anchor": "end", class: "tick" }, String(yMax)),
    svgNode("text", { x: MARGIN.left - 4, y: bottom, "text-anchor": "end", class: "tick" }, "0"),
    svgNode("text", { x: 4, y: (MARGIN.top + bottom) / 2, class: "tick" }, yLabel),
  );
}

// series: [{name, points: [[secondsAgo, value], ...]}], drawn from `spanSeconds` ago (left) to now (right).
export function lineChart(svg, series, spanSeconds, yLabel) {
  svg.replaceChildren();
  const yMax = niceMax(Math.max(0, ...series.flatMap((s) => s.points.map(([, v]) => v))));
  axes(svg, yMax, yLabel);
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const x = (ago) => MARGIN.left + plotWidth * (1 - ago / spanSeconds);
  const y = (v) => MARGIN.top + plotHeight * (1 - v / yMax);
  svg.append(
    svgNode("text", { x: MARGIN.left, y: HEIGHT - 6, class: "tick" }, `−${spanSeconds / 60} min`),
    svgNode("text", { x: WIDTH - MARGIN.right, y: HEIGHT - 6, "text-anchor": "end", class: "tick" }, "now"),
  );
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const points = s.points.map(([ago, v]) => `${x(ago).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const line = svgNode("polyline", { points, fill: "none", stroke: color, "stroke-width": 2, "data-series": s.name });
    line.append(svgNode("title", {}, s.name));
    svg.append(line);
    svg.append(svgNode("text", { x: WIDTH - MARGIN.right, y: MARGIN.top + 12 * (i + 1), "text-anchor": "end",
      fill: color, class: "legend" }, s.name));
  });
}

// bars: [{label, value}], one bar each with its value above it.
export function barChart(svg, bars, yLabel) {
  svg.replaceChildren();
  const yMax = niceMax(Math.max(0, ...bars.map((b) => b.value)));
  axes(svg, yMax, yLabel);
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const slot = plotWidth / bars.length;
  bars.forEach((bar, i) => {
    const height = (plotHeight * bar.value) / yMax;
    const left = MARGIN.left + i * slot + slot * 0.15;
    const top = MARGIN.top + plotHeight - height;
    svg.append(
      svgNode("rect", { x: left, y: top, width: slot * 0.7, height, fill: COLORS[0], "data-label": bar.label,
        "data-value": bar.value }),
      svgNode("text", { x: left + slot * 0.35, y: top - 2, "text-anchor": "middle", class: "tick" }, String(bar.value)),
      svgNode("text", { x: left + slot * 0.35, y: HEIGHT - 8, "text-anchor": "middle", class: "tick" }, bar.label),
    );
  });
}
