// uPlot (vendored, a global from vendor/uPlot.iife.min.js) wrapped for live series.
import { ema } from "./groups.js";

const PALETTE = ["#2f6fdf", "#d9472b", "#218a4a", "#8a4fd1", "#c98a00", "#0f8fa3"];
const HEIGHT = 200;

// Learning rates and small losses need significant digits, not uPlot's fixed decimals ("0").
const tick = (v) => (v === 0 || (Math.abs(v) >= 0.01 && Math.abs(v) < 1e5) ? String(+v.toFixed(4)) : v.toExponential(1));

// Vertical dashed lines at given steps (resumes, guard events), drawn over the plot area after each redraw.
function markerHook(markers) {
  return (u) => {
    const { ctx, bbox } = u;
    for (const { step, color } of markers()) {
      const x = Math.round(u.valToPos(step, "x", true));
      if (x < bbox.left || x > bbox.left + bbox.width) continue;
      ctx.save();
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5 * devicePixelRatio;
      ctx.setLineDash([5 * devicePixelRatio, 4 * devicePixelRatio]);
      ctx.beginPath();
      ctx.moveTo(x, bbox.top);
      ctx.lineTo(x, bbox.top + bbox.height);
      ctx.stroke();
      ctx.restore();
    }
  };
}

export function makeChart(container, { title, labels, xLabel = "step", log = false, markers = () => [],
  colors = PALETTE, widths = [], legend = labels.length > 1 }) {
  const width = () => Math.max(240, container.clientWidth - 4);
  // The legend (off by default for one series: it would only repeat the title) names each series.
  const series = [{ label: xLabel }, ...labels.map((label, i) => ({
    label, stroke: colors[i % colors.length], width: widths[i] ?? 1.5, spanGaps: true, points: { size: 4 },
  }))];
    const plot = new uPlot({
    title, width: width(), height: HEIGHT, series,
    scales: { x: { time: false }, y: log ? { distr: 3, log: 10 } : {} },
    legend: { show: legend },
    hooks: { draw: [markerHook(markers)] },
    axes: [{ label: xLabel }, { size: 64, values: (_u, ticks) => ticks.map(tick) }],
  }, [[], ...labels.map(() => [])], container);
  // Charts follow their container (phone rotation, window resize, a folded section opened) without a reload.
  const observer = new ResizeObserver(() => {
    if (container.clientWidth) plot.setSize({ width: width(), height: HEIGHT });
  });
  observer.observe(container);
  return {
    plot,
    setData: (data) => plot.setData(data),
    destroy: () => { observer.disconnect(); plot.destroy(); },
  };
}

// One metric on the job page: the raw points faint, their moving average on top (TensorBoard's way).
export function metricChart(container, { title, log, markers }) {
  const chart = makeChart(container, { title, labels: ["raw", "smoothed"], log, markers,
                                       colors: ["rgba(47,111,223,.28)", "#2f6fdf"], widths: [1, 1.8], legend: false });
  return {
    ...chart,
    draw(x, y, smoothing) {
      // A log axis cannot place zero or negatives: they become gaps rather than breaking the scale.
      const ys = log ? y.map((v) => (v !== null && v > 0 ? v : null)) : y;
      const smoothed = ema(ys, smoothing);
      chart.plot.setSeries(1, { show: smoothing > 0 });
      chart.plot.setData([x, ys, smoothed]);
      return smoothed;
    },
  };
}

// One series per job, joined on a common x (uPlot.join fills the gaps with nulls).
export function joined(tables) {
  return tables.length ? uPlot.join(tables) : [[]];
}
