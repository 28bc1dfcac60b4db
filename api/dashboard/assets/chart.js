// A small SVG line chart of one metric over a time window.
//
// It fills its container's width (redrawn when that changes) and draws: a time axis with
// ticks at round times, spaced so that labels never overlap at any width; a value axis
// with round ticks between the data's min and max; the line, broken where data is missing;
// and a readout of the nearest point under the pointer or finger (arrow keys move it when
// the chart has focus). The root element carries, for tests and tools, `data-metric`,
// `data-points` (the points in the window), `data-from` and `data-to` (the window, epoch
// ms), `data-step` (the buckets' width in ms, empty for raw points) and `data-max-points`
// (the most points the chart was planned for).
//
// Live points are added as they come. Once the chart holds more than twice the points it
// was planned for, `add` says so (it should be loaded again, planned anew), and beyond four
// times that it drops the oldest, so a fast device cannot grow it without bound.

import { s, h } from './dom.js';
import { duration, value as formatValue } from './format.js';

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
/** Tick spacings to choose from; the smallest whose labels fit is taken. */
const TIME_STEPS = [
  SECOND, 2 * SECOND, 5 * SECOND, 10 * SECOND, 15 * SECOND, 30 * SECOND,
  MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE,
  HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY,
];
const HEIGHT = 200;
const MARGIN = { top: 12, right: 14, bottom: 26 };
/** Rough width of one label character at the axis font size, in pixels. */
const CHAR_PX = 7;
/** The planned points when the loader gives none. */
const DEFAULT_MAX_POINTS = 1000;

const clock = (opts) => new Intl.DateTimeFormat(undefined, { hourCycle: 'h23', ...opts });
const LABELS = {
  seconds: clock({ hour: '2-digit', minute: '2-digit', second: '2-digit' }),
  minutes: clock({ hour: '2-digit', minute: '2-digit' }),
  days: clock({ month: 'short', day: 'numeric' }),
  readout: clock({ month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' }),
};

/** A tick's label: the time of day, or the date at local midnight on coarse axes. */
function timeLabel(ms, step) {
  if (step < MINUTE) return LABELS.seconds.format(ms);
  const midnight = new Date(ms).setHours(0, 0, 0, 0) === ms;
  if (step >= DAY || (step >= HOUR && midnight)) return LABELS.days.format(ms);
  return LABELS.minutes.format(ms);
}

/** Ticks at round times (local time for hours and days) from `from` to `to`. */
export function timeTicks(from, to, width) {
  const span = Math.max(to - from, 1);
  const step = TIME_STEPS.find((st) => {
    const labelPx = timeLabel(from, st).length * CHAR_PX + 24;
    return (st / span) * width >= labelPx;
  }) || TIME_STEPS[TIME_STEPS.length - 1];
  let first;
  if (step < HOUR) {
    first = Math.ceil(from / step) * step;
  } else {
    // Hours and days count from local midnight, so that ticks read 06:00, 12:00, …
    const midnight = new Date(from);
    midnight.setHours(0, 0, 0, 0);
    first = midnight.getTime() + Math.ceil((from - midnight.getTime()) / step) * step;
  }
  const ticks = [];
  for (let t = first; t <= to; t += step) ticks.push(t);
  return { step, ticks };
}

/** Round value ticks covering [min, max], about `count` of them. */
export function valueTicks(min, max, count) {
  if (min === max) {
    const pad = Math.abs(min) > 0 ? Math.abs(min) * 0.05 : 1;
    min -= pad;
    max += pad;
  }
  const rough = (max - min) / Math.max(count, 1);
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((st) => st >= rough) || 10 * power;
  const lo = Math.floor(min / step) * step;
  const hi = Math.ceil(max / step) * step;
  const ticks = [];
  for (let v = lo; v <= hi + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  return { lo, hi, step, ticks };
}

/** Index of the point whose time is nearest `t` (points sorted by time). */
function nearest(points, t) {
  let lo = 0;
  let hi = points.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < t) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs(points[lo - 1][0] - t) <= Math.abs(points[lo][0] - t)) return lo - 1;
  return lo;
}

/** The smallest and largest of the points' values ([0, 1] when there are none), in one
 * pass: spreading a large array into `Math.min` overflows the stack. */
function extent(points) {
  if (!points.length) return [0, 1];
  let min = Infinity;
  let max = -Infinity;
  for (const p of points) {
    if (p[1] < min) min = p[1];
    if (p[1] > max) max = p[1];
  }
  return [min, max];
}

/** The largest spacing of neighbours that still counts as one line, not a gap. */
function gapThreshold(points, step, span) {
  if (step) return step * 1.5;
  const deltas = [];
  for (let i = 1; i < points.length; i++) deltas.push(points[i][0] - points[i - 1][0]);
  if (!deltas.length) return Infinity;
  deltas.sort((a, b) => a - b);
  const median = deltas[deltas.length >> 1];
  return Math.max(median * 3, span / 200);
}

export class LineChart {
  /** `metric`: the name shown and put in `data-metric`. */
  constructor(metric) {
    this.metric = metric;
    this.points = [];
    this.step = null;
    this.maxPoints = DEFAULT_MAX_POINTS;
    this.from = Date.now() - HOUR;
    this.to = Date.now();
    this.cursor = null;
    this.live = new Map();
    this.svg = s('svg', { class: 'chart-svg', height: HEIGHT, 'aria-hidden': 'true' });
    this.summary = h('span', { class: 'chart-summary' });
    this.readout = h('output', { class: 'chart-readout', 'aria-live': 'polite' });
    this.el = h('figure', {
      class: 'chart',
      tabindex: '0',
      'aria-label': `Chart of ${metric}; arrow keys read its points`,
      dataset: { metric, points: '0' },
    },
    h('figcaption', {}, h('strong', {}, metric), this.summary),
    this.svg,
    this.readout);
    this.el.addEventListener('pointermove', (e) => this.pointAt(e));
    this.el.addEventListener('pointerdown', (e) => this.pointAt(e));
    this.el.addEventListener('pointerleave', (e) => {
      if (e.pointerType === 'mouse') this.setCursor(null);
    });
    this.el.addEventListener('keydown', (e) => this.key(e));
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(this.svg);
  }

  /** Replaces the data: `points` as [ts, number] sorted by time, `step` when bucketed,
   * `maxPoints` what the answer was planned for. */
  set(points, { from, to, step, maxPoints = DEFAULT_MAX_POINTS }) {
    this.points = points;
    this.step = step || null;
    this.maxPoints = maxPoints;
    this.live.clear();
    this.window(from, to);
  }

  /** Moves the window (the data outside it is dropped) and redraws. */
  window(from, to) {
    this.from = from;
    this.to = to;
    const keepFrom = this.step ? Math.floor(from / this.step) * this.step : from;
    const first = this.points.findIndex((p) => p[0] >= keepFrom);
    if (first > 0) this.points.splice(0, first);
    else if (first < 0) this.points = [];
    for (const t of this.live.keys()) {
      if (t < keepFrom) this.live.delete(t);
    }
    this.mark();
    this.draw();
  }

  /** Says on the root element what the chart holds. */
  mark() {
    Object.assign(this.el.dataset, {
      points: String(this.points.length),
      from: String(this.from),
      to: String(this.to),
      step: this.step ? String(this.step) : '',
      maxPoints: String(this.maxPoints),
    });
  }

  /** Adds a live point. Bucketed data gets it averaged into its bucket (with the live points
   * seen so far there) until the next reload. Returns whether the chart holds more than
   * twice the points it was planned for: then it should be loaded again, planned anew. */
  add(ts, v) {
    let t = ts;
    let y = v;
    if (this.step) {
      t = Math.floor(ts / this.step) * this.step;
      const last = this.points[this.points.length - 1];
      const acc = this.live.get(t) || (last && last[0] === t ? { sum: last[1], n: 1 } : { sum: 0, n: 0 });
      acc.sum += v;
      acc.n += 1;
      this.live.set(t, acc);
      y = acc.sum / acc.n;
    }
    const i = this.points.length ? nearest(this.points, t) : -1;
    if (i >= 0 && this.points[i][0] === t) this.points[i] = [t, y];
    else if (i < 0 || t > this.points[this.points.length - 1][0]) this.points.push([t, y]);
    else this.points.splice(this.points[i][0] < t ? i + 1 : i, 0, [t, y]);
    const cap = 4 * this.maxPoints;
    if (this.points.length > cap) this.points.splice(0, this.points.length - cap);
    return this.points.length > 2 * this.maxPoints;
  }

  destroy() {
    this.resize.disconnect();
  }

  pointAt(event) {
    if (!this.layout || !this.points.length) return;
    const box = this.svg.getBoundingClientRect();
    const { x0, x1 } = this.layout;
    const x = Math.min(Math.max(event.clientX - box.left, x0), x1);
    const t = this.from + ((x - x0) / (x1 - x0)) * (this.to - this.from);
    this.setCursor(nearest(this.points, t));
  }

  key(event) {
    if (!this.points.length) return;
    const last = this.points.length - 1;
    const moves = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity };
    if (event.key === 'Escape') {
      this.setCursor(null);
      return;
    }
    if (!(event.key in moves)) return;
    event.preventDefault();
    const from = this.cursor ?? last;
    this.setCursor(Math.min(Math.max(from + moves[event.key], 0), last));
  }

  setCursor(i) {
    this.cursor = i;
    this.draw();
  }

  /** Draws everything again at the container's current width. */
  draw() {
    const width = Math.floor(this.svg.getBoundingClientRect().width);
    if (!width) return;
    const points = this.points;
    this.mark();
    const [min, max] = extent(points);
    const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
    const y = valueTicks(min, max, Math.max(2, Math.floor(plotHeight / 40)));
    const labels = y.ticks.map((v) => formatValue(v));
    const x0 = Math.max(...labels.map((l) => l.length)) * CHAR_PX + 12;
    const x1 = width - MARGIN.right;
    const yTop = MARGIN.top;
    const yBottom = HEIGHT - MARGIN.bottom;
    this.layout = { x0, x1 };
    const span = Math.max(this.to - this.from, 1);
    const px = (t) => x0 + ((t - this.from) / span) * (x1 - x0);
    const py = (v) => yBottom - ((v - y.lo) / (y.hi - y.lo || 1)) * (yBottom - yTop);

    const grid = [];
    y.ticks.forEach((v, i) => {
      const yy = py(v);
      grid.push(s('line', { class: 'grid', x1: x0, x2: x1, y1: yy, y2: yy }));
      grid.push(s('text', { class: 'tick y', x: x0 - 6, y: yy, 'dominant-baseline': 'middle', 'text-anchor': 'end' }, labels[i]));
    });
    const t = timeTicks(this.from, this.to, x1 - x0);
    for (const tick of t.ticks) {
      const xx = px(tick);
      grid.push(s('line', { class: 'grid', x1: xx, x2: xx, y1: yTop, y2: yBottom }));
      grid.push(s('text', { class: 'tick x', x: xx, y: HEIGHT - 8, 'text-anchor': 'middle' }, timeLabel(tick, t.step)));
    }

    // The line, in runs of points whose neighbours are close enough; lone points as dots.
    const gap = gapThreshold(points, this.step, span);
    const runs = [];
    let run = [];
    points.forEach((p, i) => {
      if (i > 0 && p[0] - points[i - 1][0] > gap) {
        runs.push(run);
        run = [];
      }
      run.push(p);
    });
    if (run.length) runs.push(run);
    const marks = runs.map((r) => (r.length === 1
      ? s('circle', { class: 'dot', cx: px(r[0][0]), cy: py(r[0][1]), r: 2.5 })
      : s('path', {
        class: 'line',
        d: r.map((p, i) => `${i ? 'L' : 'M'}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(''),
      })));

    const overlay = [];
    if (this.cursor !== null && points[this.cursor]) {
      const [ct, cv] = points[this.cursor];
      overlay.push(s('line', { class: 'cursor', x1: px(ct), x2: px(ct), y1: yTop, y2: yBottom }));
      overlay.push(s('circle', { class: 'cursor-dot', cx: px(ct), cy: py(cv), r: 4 }));
      const what = this.step ? `(average over ${duration(this.step)}) from` : 'at';
      this.readout.textContent = `${formatValue(cv)} ${what} ${LABELS.readout.format(ct)}`;
    } else {
      this.readout.textContent = points.length ? 'Point at the chart to read a value.' : '';
    }

    this.svg.setAttribute('viewBox', `0 0 ${width} ${HEIGHT}`);
    this.svg.replaceChildren(
      s('rect', { class: 'plot', x: x0, y: yTop, width: Math.max(x1 - x0, 0), height: yBottom - yTop }),
      ...grid,
      ...marks,
      ...overlay,
    );
    if (!points.length) {
      this.svg.append(s('text', { class: 'empty', x: (x0 + x1) / 2, y: (yTop + yBottom) / 2, 'text-anchor': 'middle' }, 'No data in this range'));
      this.summary.textContent = '';
    } else {
      const last = points[points.length - 1][1];
      this.summary.textContent = `min ${formatValue(min)} · max ${formatValue(max)} · last ${formatValue(last)}`;
    }
  }
}
