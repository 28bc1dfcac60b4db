// How times, values and JSON are written on the page.

const timeFormat = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
});
const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
  month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
});
const yearFormat = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', hourCycle: 'h23',
});

/** An absolute time: today's as a time of day, others with their date (and year, if not
 * this one). */
export function when(ms) {
  if (ms === null || ms === undefined) return '—';
  const d = new Date(ms);
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return timeFormat.format(d);
  return d.getFullYear() === today.getFullYear() ? dateTimeFormat.format(d) : yearFormat.format(d);
}

/** A time relative to now: "12 s ago", "3 min ago", "in 2 h". */
export function ago(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return 'never';
  const diff = Math.round((now - ms) / 1000);
  const future = diff < 0;
  const s = Math.abs(diff);
  const text = s < 5 ? 'just now'
    : s < 60 ? `${s} s`
      : s < 3600 ? `${Math.round(s / 60)} min`
        : s < 86400 ? `${Math.round(s / 3600)} h`
          : `${Math.round(s / 86400)} d`;
  if (text === 'just now') return text;
  return future ? `in ${text}` : `${text} ago`;
}

/** A span of time in its largest whole unit: "30 s", "5 min", "2 h", "7 d". */
export function duration(ms) {
  const units = [[86400000, 'd'], [3600000, 'h'], [60000, 'min'], [1000, 's']];
  for (const [size, name] of units) {
    if (ms >= size && ms % size === 0) return `${ms / size} ${name}`;
  }
  return ms >= 1000 ? `${Math.round(ms / 1000)} s` : `${ms} ms`;
}

/** A telemetry value: numbers with at most 4 significant decimals, the rest as they are. */
export function value(v) {
  if (typeof v === 'number') {
    if (Number.isInteger(v)) return String(v);
    return String(Number(v.toPrecision(6)));
  }
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (v === null || v === undefined) return '—';
  return typeof v === 'string' ? v : JSON.stringify(v);
}

/** A chartable number for a telemetry value (booleans as 0 and 1), or null. */
export function numeric(v) {
  if (typeof v === 'number' && Number.isFinite(v)) return v;
  if (typeof v === 'boolean') return v ? 1 : 0;
  return null;
}

/** JSON, indented, for reading. */
export function json(v) {
  return JSON.stringify(v, null, 2);
}

/** Parses JSON typed by a person; the error says where it is wrong. */
export function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not valid JSON: ${e.message}`);
  }
}
