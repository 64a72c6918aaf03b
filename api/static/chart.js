// uPlot (vendored, a global from vendor/uPlot.iife.min.js) wrapped for live series.
const PALETTE = ["#2f6fdf", "#d9472b", "#218a4a", "#8a4fd1", "#c98a00", "#0f8fa3"];

// Learning rates and small losses need significant digits, not uPlot's fixed decimals ("0").
const tick = (v) => (v === 0 || (Math.abs(v) >= 0.01 && Math.abs(v) < 1e5) ? String(+v.toFixed(4)) : v.toExponential(1));

export function makeChart(container, { title, labels, xLabel = "step" }) {
  const width = () => Math.max(240, container.clientWidth - 4);
  const series = [{ label: xLabel }, ...labels.map((label, i) => ({
    label, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true, points: { size: 4 },
  }))];
  // The legend only repeats the title when there is one series.
  const plot = new uPlot({ title, width: width(), height: 220, series, scales: { x: { time: false } },
                           legend: { show: labels.length > 1 },
                           axes: [{ label: xLabel }, { size: 64, values: (_u, ticks) => ticks.map(tick) }] }, [[], ...labels.map(() => [])], container);
  // Charts follow their container (phone rotation, window resize) without a reload.
  const observer = new ResizeObserver(() => plot.setSize({ width: width(), height: 220 }));
  observer.observe(container);
  return {
    plot,
    setData: (data) => plot.setData(data),
    destroy: () => { observer.disconnect(); plot.destroy(); },
  };
}

// One series per job, joined on a common x (uPlot.join fills the gaps with nulls).
export function joined(tables) {
  return tables.length ? uPlot.join(tables) : [[]];
}
