// One device: presence and tags, latest values, live charts, commands, state, connections.
//
// Everything is loaded from the API each time the live stream (`/stream?device=<id>`)
// opens, then kept current from it: telemetry extends the latest values and the charts,
// command events move the history's statuses, presence and state events reload those parts.
// A `lagged` event (the stream missed some) reloads everything.
//
// The desired state is edited as a whole document. The edit remembers the version and the
// document it started from: saving sends the difference from that document with that
// version, so a change someone else made meanwhile is refused (409) rather than
// overwritten, and the text being edited is never replaced by a newer state.

import { h, notice, replace, actionButton } from './dom.js';
import { api, canOperate, pooled } from './api.js';
import { follow, coalesce, debounce } from './live.js';
import { LineChart } from './chart.js';
import { ago, when, value as formatValue, numeric, json, parseJson, duration } from './format.js';

const RANGES = [
  ['15m', 15 * 60000, '15 min'],
  ['1h', 3600000, '1 h'],
  ['6h', 6 * 3600000, '6 h'],
  ['24h', 24 * 3600000, '24 h'],
  ['7d', 7 * 24 * 3600000, '7 d'],
];
const FINAL = new Set(['succeeded', 'failed', 'expired', 'cancelled']);
/** How far a command has come: its statuses in the order they happen. */
const PROGRESS = { queued: 0, sent: 1, delivered: 2 };
/** The most metrics one `metrics=` request may name. */
const MAX_METRICS = 32;
const STATUS_CLASS = { succeeded: 'ok', failed: 'bad', expired: 'off', cancelled: 'off' };

function progress(status) {
  return FINAL.has(status) ? 3 : PROGRESS[status] ?? 0;
}

/** Whether `c` is newer news of a command than `known`: a command never leaves a final
 * status; otherwise the later change (`updated_at_ms`) wins, and of two at the same
 * millisecond the one further along. */
export function supersedes(c, known) {
  if (!known) return true;
  if (FINAL.has(known.status) && !FINAL.has(c.status)) return false;
  if (c.updated_at_ms !== known.updated_at_ms) return c.updated_at_ms > known.updated_at_ms;
  return progress(c.status) >= progress(known.status);
}

/** The merge patch (RFC 7396) that turns `from` into `to`: removed keys become null. */
export function mergePatch(from, to) {
  const isObject = (v) => v && typeof v === 'object' && !Array.isArray(v);
  if (!isObject(from) || !isObject(to)) return to;
  const patch = {};
  for (const key of Object.keys(from)) {
    if (!(key in to)) patch[key] = null;
  }
  for (const [key, value] of Object.entries(to)) {
    if (!(key in from)) patch[key] = value;
    else if (JSON.stringify(from[key]) !== JSON.stringify(value)) patch[key] = mergePatch(from[key], value);
  }
  return patch;
}

function section(id, title, ...children) {
  return h('section', { class: 'panel', id, 'aria-labelledby': `${id}-title` },
    h('h2', { id: `${id}-title` }, title), ...children);
}

export function render(root, { params: [id], signal, role }) {
  const base = `/devices/${encodeURIComponent(id)}`;
  const canAct = canOperate(role);
  const error = notice();
  const feedError = notice();
  const liveState = h('span', { class: 'live-state', role: 'status' }, 'connecting…');
  const headline = h('div', { class: 'device-meta' });

  // Latest values.
  const latest = new Map();
  // Whether the latest values have been loaded once (the charts' metrics are picked then).
  let latestLoaded = false;
  const latestBody = h('tbody', { id: 'latest' });

  // Charts.
  let range = RANGES[1];
  const chosen = new Set();
  const charts = new Map();
  const chartGrid = h('div', { class: 'charts', id: 'charts' });
  const metricPicker = h('fieldset', { class: 'metrics' }, h('legend', {}, 'Metrics'));
  const rangePicker = h('fieldset', { class: 'segmented' }, h('legend', {}, 'Range'),
    RANGES.map((r) => {
      const input = h('input', { type: 'radio', name: 'range', id: `range-${r[0]}`, value: r[0], checked: r === range });
      input.addEventListener('change', () => {
        range = r;
        loadCharts();
      });
      return h('span', {}, input, h('label', { for: `range-${r[0]}` }, r[2]));
    }));
  const chartNote = h('p', { class: 'hint', id: 'chart-note', role: 'status' });
  // Live points that come while the charts load, by metric, put back on top of the answer.
  let pending = null;

  // Commands.
  const commandNotice = notice();
  const commandSent = notice('info');
  const commandBody = h('tbody', { id: 'command-history' });
  // The commands shown, by id: `{command, tr}`.
  const commandRows = new Map();

  // State.
  const stateView = h('div', { class: 'state', id: 'state' });
  const stateNotice = notice();
  const desiredInput = h('textarea', { id: 'desired', rows: 6, spellcheck: 'false', 'aria-describedby': 'desired-help' });
  const staleNote = h('p', { class: 'notice info', id: 'desired-stale', role: 'status', hidden: true });
  const discardButton = h('button', { type: 'button', id: 'desired-discard', disabled: true }, 'Discard changes');
  let stateNow = null;
  // What the text area was last filled with, `{version, desired}`: the base of an edit.
  let shown = null;
  // Whether the text area holds an edit not saved yet: it is not replaced then.
  let dirty = false;

  // Connections.
  const connectionsBody = h('tbody', { id: 'connections' });

  const commandForm = buildCommandForm();
  const stateForm = buildStateForm();
  replace(root,
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '#/' }, 'Fleet'), ' / ', h('span', { 'aria-current': 'page' }, id)),
    h('div', { class: 'device-head' }, h('h1', {}, id), liveState),
    headline,
    feedError,
    error,
    section('charts-panel', 'Charts', h('div', { class: 'chart-controls' }, rangePicker, metricPicker), chartNote, chartGrid),
    h('div', { class: 'columns' },
      section('latest-panel', 'Latest values',
        h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Metric'), h('th', { scope: 'col' }, 'Value'), h('th', { scope: 'col' }, 'At'))),
          latestBody))),
      section('state-panel', 'State', stateView, stateForm)),
    section('commands-panel', 'Commands', commandForm, commandNotice, commandSent,
      h('div', { class: 'table-wrap' }, h('table', { class: 'responsive' },
        h('caption', { class: 'visually-hidden' }, 'Command history, newest first'),
        h('thead', {}, h('tr', {},
          ['Command', 'Status', 'Sent', 'Params', 'Output', ''].map((t) => h('th', { scope: 'col' }, t)))),
        commandBody))),
    section('connections-panel', 'Connections',
      h('div', { class: 'table-wrap' }, h('table', { class: 'responsive' },
        h('thead', {}, h('tr', {},
          ['Connected', 'Ended', 'Lasted', 'Reason', 'Peer', 'MQTT'].map((t) => h('th', { scope: 'col' }, t)))),
        connectionsBody))));

  function fail(e, where = error) {
    if (e.name === 'AbortError') return;
    where.show(e.message);
  }

  // --- Header: presence, tags, status ---------------------------------------------------

  let device = null;
  let presence = null;
  function drawHeadline() {
    const items = [];
    if (presence) {
      items.push(h('span', { class: `badge ${presence.online ? 'ok' : 'off'}`, id: 'presence' }, presence.online ? 'online' : 'offline'));
      items.push(h('span', {}, presence.online
        ? `connected ${ago(presence.connected_since_ms)}`
        : `last seen ${ago(presence.last_seen_ms)}${presence.last_disconnect_reason ? ` (${presence.last_disconnect_reason})` : ''}`));
    }
    if (device) {
      if (device.status === 'disabled') items.push(h('span', { class: 'badge warn' }, 'disabled'));
      for (const [k, v] of Object.entries(device.tags)) {
        items.push(h('a', { class: 'chip', href: `#/?tag=${encodeURIComponent(`${k}:${v}`)}` }, `${k}:${v}`));
      }
      if (device.cert_not_after) items.push(h('span', { class: 'hint' }, `certificate until ${when(Date.parse(device.cert_not_after))}`));
    }
    replace(headline, items);
  }

  let deviceLoad = 0;
  async function loadDevice() {
    const load = ++deviceLoad;
    const [d, p] = await Promise.all([api(base, { signal }), api(`${base}/presence`, { signal })]);
    if (load !== deviceLoad) return;
    device = d;
    presence = p;
    drawHeadline();
  }

  // --- Latest values and charts ---------------------------------------------------------

  function drawLatest() {
    const rows = [...latest.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([metric, p]) =>
      h('tr', { dataset: { metric } },
        h('th', { scope: 'row' }, metric),
        h('td', { class: 'num' }, formatValue(p.value)),
        h('td', { title: when(p.ts) }, ago(p.ts))));
    replace(latestBody, rows.length ? rows : h('tr', {}, h('td', { colspan: 3, class: 'empty' }, 'No telemetry yet.')));
  }

  function chartable() {
    return [...latest.entries()].filter(([, p]) => numeric(p.value) !== null).map(([m]) => m).sort();
  }

  function drawPicker() {
    const metrics = chartable();
    if (!chosen.size && latestLoaded) metrics.slice(0, 2).forEach((m) => chosen.add(m));
    replace(metricPicker, h('legend', {}, 'Metrics'),
      metrics.length ? metrics.map((m) => {
        const box = h('input', { type: 'checkbox', id: `metric-${m}`, value: m, checked: chosen.has(m) });
        box.addEventListener('change', () => {
          if (box.checked) chosen.add(m);
          else chosen.delete(m);
          loadCharts();
        });
        return h('span', {}, box, h('label', { for: `metric-${m}` }, m));
      }) : h('span', { class: 'hint' }, 'No numeric metrics yet.'));
  }

  function windowNow() {
    const to = Date.now();
    return { from: to - range[1], to };
  }

  let chartLoad = 0;
  async function loadCharts() {
    const load = ++chartLoad;
    const metrics = [...chosen].filter((m) => latest.has(m)).sort();
    for (const [metric, chart] of charts) {
      if (!metrics.includes(metric)) {
        chart.destroy();
        chart.el.remove();
        charts.delete(metric);
      }
    }
    for (const metric of metrics) {
      if (!charts.has(metric)) {
        const chart = new LineChart(metric);
        charts.set(metric, chart);
        chartGrid.append(chart.el);
      }
    }
    if (!metrics.length) {
      chartNote.textContent = 'Choose metrics to chart.';
      return;
    }
    // One point per pixel of the chart's width: the server plans the step from it.
    const width = Math.round(chartGrid.firstElementChild?.getBoundingClientRect().width || chartGrid.getBoundingClientRect().width || 600);
    const maxPoints = Math.min(Math.max(width, 50), 4000);
    const { from, to } = windowNow();
    const arrived = new Map();
    pending = arrived;
    try {
      const answer = await series(metrics, { from, to, max_points: maxPoints });
      if (load !== chartLoad) return;
      const steps = new Set();
      let again = false;
      for (const one of answer) {
        const chart = charts.get(one.metric);
        if (!chart) continue;
        const points = [];
        for (const [ts, v] of one.points) {
          const n = numeric(v);
          if (n !== null) points.push([ts, n]);
        }
        chart.set(points, { from, to, step: one.step, maxPoints });
        const late = arrived.get(one.metric) || [];
        for (const [ts, v] of late) {
          if (ts >= from && chart.add(ts, v)) again = true;
        }
        if (late.length) chart.window(from, to);
        steps.add(one.step ? `${one.metric}: averages over ${duration(one.step)}` : `${one.metric}: every point`);
      }
      chartNote.textContent = `Last ${range[2]}; ${[...steps].join('; ')}.`;
      if (again) replanCharts();
    } catch (e) {
      if (load === chartLoad) fail(e);
    } finally {
      if (pending === arrived) pending = null;
    }
  }

  /** The series of `metrics` over `params`. `metrics=` takes at most MAX_METRICS names
   * and splits them at commas, so names holding one are asked for alone with `metric=`,
   * and the others in lists of at most MAX_METRICS. */
  async function series(metrics, params) {
    const tasks = [];
    const listed = [];
    for (const metric of metrics) {
      if (metric.includes(',')) {
        tasks.push(async () => {
          const one = await api(`${base}/telemetry`, { params: { ...params, metric }, signal });
          return [{ metric: one.metric, points: one.points, step: one.step }];
        });
      } else {
        listed.push(metric);
      }
    }
    for (let i = 0; i < listed.length; i += MAX_METRICS) {
      const names = listed.slice(i, i + MAX_METRICS).join(',');
      tasks.push(async () => (await api(`${base}/telemetry`, { params: { ...params, metrics: names }, signal })).series);
    }
    return (await pooled(tasks)).flat();
  }

  // A chart that has taken in more live points than it was planned for is loaded again,
  // so that the server plans it anew (in buckets, if need be).
  const replanCharts = debounce(loadCharts, 1000);

  const redrawCharts = coalesce(() => {
    const { from, to } = windowNow();
    for (const chart of charts.values()) chart.window(from, to);
  });

  async function loadLatest() {
    const answer = await api(`${base}/latest`, { signal });
    // Merged: a point that came live while this was asked may be newer than the answer.
    for (const [metric, p] of Object.entries(answer.metrics)) {
      const known = latest.get(metric);
      if (!known || p.ts >= known.ts) latest.set(metric, p);
    }
    latestLoaded = true;
    drawLatest();
    drawPicker();
  }

  // --- Commands -------------------------------------------------------------------------

  function commandRow(c) {
    const cancel = canAct && (c.status === 'queued' || c.status === 'sent')
      ? actionButton('Cancel', async () => {
        try {
          upsertCommand(await api(`${base}/commands/${encodeURIComponent(c.id)}`, { method: 'DELETE', signal }));
        } catch (e) {
          fail(e, commandNotice);
        }
      }, { class: 'small' })
      : null;
    return h('tr', { dataset: { commandId: c.id, status: c.status, name: c.name } },
      h('th', { scope: 'row', 'data-label': 'Command' }, c.name, h('div', { class: 'hint mono' }, c.id)),
      h('td', { 'data-label': 'Status' }, h('span', { class: `badge ${STATUS_CLASS[c.status] || 'info'}` }, c.status)),
      h('td', { 'data-label': 'Sent', title: when(c.created_at_ms) }, ago(c.created_at_ms)),
      h('td', { 'data-label': 'Params' }, h('code', { class: 'json' }, JSON.stringify(c.params))),
      h('td', { 'data-label': 'Output' }, c.output === null || c.output === undefined ? '—' : h('code', { class: 'json' }, JSON.stringify(c.output))),
      h('td', {}, cancel));
  }

  /** Shows `c`, unless what is shown of it is newer: events and answers can come late. */
  function upsertCommand(c) {
    const known = commandRows.get(c.id);
    if (!supersedes(c, known?.command)) return;
    const tr = commandRow(c);
    if (known) {
      known.tr.replaceWith(tr);
    } else {
      commandBody.querySelector('td.empty')?.closest('tr').remove();
      commandBody.prepend(tr);
    }
    commandRows.set(c.id, { command: c, tr });
  }

  let commandLoad = 0;
  async function loadCommands() {
    const load = ++commandLoad;
    const answer = await api(`${base}/commands`, { params: { limit: 20 }, signal });
    if (load !== commandLoad) return;
    // What events told while this was asked may be newer than the answer: the newer of the
    // two is kept, and commands sent since are kept too.
    const before = new Map(commandRows);
    const newest = Math.max(0, ...answer.commands.map((c) => c.created_at_ms));
    commandRows.clear();
    replace(commandBody);
    for (const c of [...answer.commands].reverse()) {
      const known = before.get(c.id)?.command;
      upsertCommand(supersedes(c, known) ? c : known);
    }
    for (const { command } of before.values()) {
      if (!commandRows.has(command.id) && command.created_at_ms > newest) upsertCommand(command);
    }
    if (!commandRows.size) replace(commandBody, h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No commands yet.')));
  }

  function buildCommandForm() {
    const name = h('input', { id: 'command-name', name: 'name', required: true, autocomplete: 'off', placeholder: 'reboot' });
    const params = h('textarea', { id: 'command-params', name: 'params', rows: 3, spellcheck: 'false' }, '{}');
    const timeout = h('input', { id: 'command-timeout', name: 'timeout', autocomplete: 'off', placeholder: '1h', 'aria-describedby': 'timeout-help' });
    const submit = h('button', { type: 'submit', class: 'primary', id: 'command-send' }, 'Send command');
    const fields = h('fieldset', { disabled: !canAct },
      h('legend', { class: 'visually-hidden' }, 'New command'),
      h('div', { class: 'field' }, h('label', { for: 'command-name' }, 'Name'), name),
      h('div', { class: 'field' }, h('label', { for: 'command-params' }, 'Parameters (JSON)'), params),
      h('div', { class: 'field' }, h('label', { for: 'command-timeout' }, 'Timeout (optional)'), timeout,
        h('span', { id: 'timeout-help', class: 'hint' }, 'e.g. 30s or 5m; 1 hour if empty')),
      h('div', { class: 'field actions' }, submit));
    const form = h('form', { id: 'command-form', class: 'command-form' },
      canAct ? null : h('p', { class: 'notice info', id: 'command-readonly' }, 'Your role (viewer) can see commands but not send them.'),
      fields);
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      commandNotice.show(null);
      commandSent.show(null);
      let body;
      try {
        body = { name: name.value.trim(), params: parseJson(params.value.trim() || 'null', 'Parameters') };
      } catch (e) {
        commandNotice.show(e.message);
        return;
      }
      if (timeout.value.trim()) body.timeout = timeout.value.trim();
      submit.disabled = true;
      try {
        const c = await api(`${base}/commands`, { method: 'POST', body, signal });
        commandSent.show(`Command ${c.name} (${c.id}) sent; its status is in the history below.`);
        upsertCommand(c);
      } catch (e) {
        fail(e, commandNotice);
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  }

  // --- State ----------------------------------------------------------------------------

  function drawState() {
    const s = stateNow;
    const block = (title, value, version, at) => h('div', { class: 'state-block' },
      h('h3', {}, title, version !== undefined ? h('span', { class: 'hint' }, ` v${version}${at ? ` · ${ago(at)}` : ''}`) : null),
      h('pre', { class: 'json' }, json(value)));
    replace(stateView,
      block('Desired', s.desired, s.desired_version, s.desired_at_ms),
      block('Reported', s.reported, s.reported_version, s.reported_at_ms),
      block('Not yet reported (delta)', s.delta));
  }

  /** Puts the desired state in the text area, unless it holds an edit. */
  function fillDesired() {
    if (!dirty) {
      shown = { version: stateNow.desired_version, desired: stateNow.desired };
      desiredInput.value = json(stateNow.desired);
    }
    drawStale();
  }

  /** Says whether the desired state has changed since the edit in the text area began. */
  function drawStale() {
    discardButton.disabled = !dirty;
    const stale = dirty && shown && stateNow && stateNow.desired_version !== shown.version;
    staleNote.hidden = !stale;
    if (!stale) return;
    const discard = h('button', { type: 'button', class: 'small', id: 'desired-reload' }, 'Discard my edit and load it');
    discard.addEventListener('click', discardEdit);
    replace(staleNote,
      `The desired state has changed since you started editing (v${shown.version} → v${stateNow.desired_version}); saving your edit will be refused. `,
      discard);
  }

  let stateLoad = 0;
  async function loadState() {
    const load = ++stateLoad;
    const answer = await api(`${base}/state`, { signal });
    if (load !== stateLoad) return;
    stateNow = answer;
    drawState();
    fillDesired();
  }

  /** Forgets the edit in the text area and shows the desired state as it is now. */
  async function discardEdit() {
    dirty = false;
    stateNotice.show(null);
    drawStale();
    try {
      await loadState();
    } catch (e) {
      fail(e, stateNotice);
    }
  }

  function buildStateForm() {
    const submit = h('button', { type: 'submit', class: 'primary', id: 'desired-save' }, 'Save desired state');
    discardButton.addEventListener('click', discardEdit);
    desiredInput.addEventListener('input', () => {
      dirty = true;
      drawStale();
    });
    const form = h('form', { id: 'state-form' },
      h('fieldset', { disabled: !canAct },
        h('legend', { class: 'visually-hidden' }, 'Desired state'),
        h('div', { class: 'field' }, h('label', { for: 'desired' }, 'Desired state (JSON)'), desiredInput,
          h('span', { id: 'desired-help', class: 'hint' }, 'Edit the whole document; removed keys are removed from the device’s desired state.')),
        staleNote,
        stateNotice,
        h('div', { class: 'field actions' }, submit, discardButton)));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      stateNotice.show(null);
      if (!shown) return; // not loaded yet
      // The edit's base: what the text area was filled with when the edit began.
      const origin = shown;
      const text = desiredInput.value;
      try {
        const edited = parseJson(text, 'The desired state');
        const patch = mergePatch(origin.desired, edited);
        submit.disabled = true;
        const saved = await api(`${base}/state`, {
          method: 'PATCH',
          body: { desired: patch, version: origin.version },
          signal,
        });
        stateLoad += 1; // an older answer in flight must not replace this one
        stateNow = saved;
        if (desiredInput.value === text) {
          dirty = false;
        } else {
          // Typed on while it was saved: that edit goes on from what was saved.
          shown = { version: saved.desired_version, desired: saved.desired };
        }
        drawState();
        fillDesired();
      } catch (e) {
        fail(e, stateNotice);
        if (e.status === 409) {
          // Someone changed it first: learn the new version, keep the edit, offer to load it.
          loadState().catch((err) => fail(err, stateNotice));
        }
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  }

  // --- Connections ----------------------------------------------------------------------

  let connectionsLoad = 0;
  async function loadConnections() {
    const load = ++connectionsLoad;
    const answer = await api(`${base}/connections`, { params: { limit: 20 }, signal });
    if (load !== connectionsLoad) return;
    replace(connectionsBody, answer.connections.length ? answer.connections.map((c) => h('tr', {},
      h('td', { 'data-label': 'Connected' }, when(c.connected_at_ms)),
      h('td', { 'data-label': 'Ended' }, c.disconnected_at_ms ? when(c.disconnected_at_ms) : h('span', { class: 'badge ok' }, 'open')),
      h('td', { 'data-label': 'Lasted' }, duration(Math.max(0, Math.round(((c.disconnected_at_ms || Date.now()) - c.connected_at_ms) / 1000) * 1000))),
      h('td', { 'data-label': 'Reason' }, c.reason || '—'),
      h('td', { 'data-label': 'Peer', class: 'mono' }, c.peer),
      h('td', { 'data-label': 'MQTT' }, c.protocol)))
      : h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'Never connected.')));
  }

  // --- Live -----------------------------------------------------------------------------

  const reloadPresence = debounce(() => Promise.all([loadDevice(), loadConnections()]).catch(fail), 300);
  const reloadState = debounce(() => loadState().catch((e) => fail(e, stateNotice)), 300);
  const redrawLatest = coalesce(drawLatest);

  function onEvent(type, event) {
    if (type === 'lagged') {
      loadAll();
      return;
    }
    if (event.device !== id) return;
    if (type === 'telemetry') {
      let added = false;
      let replan = false;
      for (const p of event.points) {
        const known = latest.get(p.metric);
        if (!known) added = true;
        if (!known || p.ts >= known.ts) latest.set(p.metric, { ts: p.ts, value: p.value });
        const v = numeric(p.value);
        const chart = charts.get(p.metric);
        if (chart && v !== null) {
          if (pending) {
            if (!pending.has(p.metric)) pending.set(p.metric, []);
            pending.get(p.metric).push([p.ts, v]);
          }
          if (chart.add(p.ts, v)) replan = true;
        }
      }
      redrawLatest();
      redrawCharts();
      if (replan) replanCharts();
      if (added && latestLoaded) {
        drawPicker();
        loadCharts();
      }
    } else if (type === 'command') {
      upsertCommand(event.command);
    } else if (type === 'presence') {
      reloadPresence();
    } else if (type === 'state') {
      reloadState();
    }
  }

  // The feed ends with the page, or once the device turns out not to exist.
  const feed = new AbortController();
  signal.addEventListener('abort', () => feed.abort(), { once: true });
  function showFeed(state, text) {
    liveState.textContent = text;
    liveState.dataset.state = state;
  }

  /** Loads everything; called each time the live feed opens, so that nothing it missed
   * while it was closed stays missing. */
  async function loadAll() {
    error.show(null);
    try {
      await Promise.all([loadDevice(), loadLatest()]);
    } catch (e) {
      fail(e);
      if (e.status === 404) {
        feed.abort();
        showFeed('stopped', 'not found');
      }
      return;
    }
    loadCharts();
    loadCommands().catch((e) => fail(e, commandNotice));
    loadState().catch((e) => fail(e, stateNotice));
    loadConnections().catch(fail);
  }

  follow({ device: id }, {
    signal: feed.signal,
    onEvent,
    reload: loadAll,
    onState(state, e) {
      showFeed(state, { connecting: 'connecting…', live: 'live', retrying: 'reconnecting…', failed: 'stopped' }[state]);
      if (state === 'failed') feedError.show(`The live feed stopped: ${e.message}`);
      else feedError.show(null);
    },
  });
  // The window slides with the clock, and "12 s ago" ages.
  const timer = setInterval(() => {
    redrawCharts();
    drawLatest();
    drawHeadline();
  }, 5000);
  signal.addEventListener('abort', () => {
    clearInterval(timer);
    for (const chart of charts.values()) chart.destroy();
  });
}
