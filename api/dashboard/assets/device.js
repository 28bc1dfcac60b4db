// One device: presence and tags, latest values, live charts, commands, state, connections.
//
// Everything is loaded from the API once, then kept current from the live stream
// (`/stream?device=<id>`): telemetry extends the latest values and the charts, command
// events move the history's statuses, presence and state events reload those parts. A
// `lagged` event (the stream missed some) reloads everything.

import { h, notice, replace, actionButton } from './dom.js';
import { api, canOperate } from './api.js';
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
const STATUS_CLASS = { succeeded: 'ok', failed: 'bad', expired: 'off', cancelled: 'off' };

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
  const liveState = h('span', { class: 'live-state', role: 'status' }, 'connecting…');
  const headline = h('div', { class: 'device-meta' });

  // Latest values.
  const latest = new Map();
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
  const chartNote = h('p', { class: 'hint', role: 'status' });

  // Commands.
  const commandNotice = notice();
  const commandSent = notice('info');
  const commandBody = h('tbody', { id: 'command-history' });
  const commandRows = new Map();

  // State.
  const stateView = h('div', { class: 'state', id: 'state' });
  const stateNotice = notice();
  const desiredInput = h('textarea', { id: 'desired', rows: 6, spellcheck: 'false', 'aria-describedby': 'desired-help' });
  let stateNow = null;

  // Connections.
  const connectionsBody = h('tbody', { id: 'connections' });

  const commandForm = buildCommandForm();
  const stateForm = buildStateForm();
  replace(root,
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '#/' }, 'Fleet'), ' / ', h('span', { 'aria-current': 'page' }, id)),
    h('div', { class: 'device-head' }, h('h1', {}, id), liveState),
    headline,
    error,
    section('charts-panel', 'Charts', h('div', { class: 'chart-controls' }, rangePicker, metricPicker), chartNote, chartGrid),
    h('div', { class: 'columns' },
      section('latest-panel', 'Latest values',
        h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Metric'), h('th', { scope: 'col' }, 'Value'), h('th', { scope: 'col' }, 'At'))),
          latestBody))),
      section('state-panel', 'State', stateNotice, stateView, stateForm)),
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

  async function loadDevice() {
    const [d, p] = await Promise.all([api(base, { signal }), api(`${base}/presence`, { signal })]);
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
    if (!chosen.size) metrics.slice(0, 2).forEach((m) => chosen.add(m));
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
    try {
      const answer = await api(`${base}/telemetry`, {
        params: { metrics: metrics.join(','), from, to, max_points: maxPoints },
        signal,
      });
      if (load !== chartLoad) return;
      const steps = new Set();
      for (const series of answer.series) {
        const chart = charts.get(series.metric);
        if (!chart) continue;
        const points = series.points
          .map(([ts, v]) => [ts, numeric(v)])
          .filter(([, v]) => v !== null);
        chart.set(points, { from, to, step: series.step });
        steps.add(series.step ? `${series.metric}: averages over ${duration(series.step)}` : `${series.metric}: every point`);
      }
      chartNote.textContent = `Last ${range[2]}; ${[...steps].join('; ')}.`;
    } catch (e) {
      fail(e);
    }
  }

  const redrawCharts = coalesce(() => {
    const { from, to } = windowNow();
    for (const chart of charts.values()) chart.window(from, to);
  });

  async function loadLatest() {
    const answer = await api(`${base}/latest`, { signal });
    latest.clear();
    for (const [metric, p] of Object.entries(answer.metrics)) latest.set(metric, p);
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

  function upsertCommand(c) {
    const tr = commandRow(c);
    const known = commandRows.get(c.id);
    if (known) {
      // A late event must not move a command back from where it ended.
      if (FINAL.has(known.dataset.status) && !FINAL.has(c.status)) return;
      known.replaceWith(tr);
    } else {
      commandBody.querySelector('td.empty')?.closest('tr').remove();
      commandBody.prepend(tr);
    }
    commandRows.set(c.id, tr);
  }

  async function loadCommands() {
    const answer = await api(`${base}/commands`, { params: { limit: 20 }, signal });
    commandRows.clear();
    replace(commandBody);
    for (const c of [...answer.commands].reverse()) upsertCommand(c);
    if (!answer.commands.length) replace(commandBody, h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No commands yet.')));
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

  async function loadState({ keepEdits = false } = {}) {
    stateNow = await api(`${base}/state`, { signal });
    drawState();
    if (!keepEdits || document.activeElement !== desiredInput) desiredInput.value = json(stateNow.desired);
  }

  function buildStateForm() {
    const submit = h('button', { type: 'submit', class: 'primary' }, 'Save desired state');
    const form = h('form', { id: 'state-form' },
      h('fieldset', { disabled: !canAct },
        h('legend', { class: 'visually-hidden' }, 'Desired state'),
        h('div', { class: 'field' }, h('label', { for: 'desired' }, 'Desired state (JSON)'), desiredInput,
          h('span', { id: 'desired-help', class: 'hint' }, 'Edit the whole document; removed keys are removed from the device’s desired state.')),
        h('div', { class: 'field actions' }, submit)));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      stateNotice.show(null);
      try {
        const edited = parseJson(desiredInput.value, 'The desired state');
        const patch = mergePatch(stateNow.desired, edited);
        stateNow = await api(`${base}/state`, {
          method: 'PATCH',
          body: { desired: patch, version: stateNow.desired_version },
          signal,
        });
        drawState();
        desiredInput.value = json(stateNow.desired);
      } catch (e) {
        fail(e, stateNotice);
      }
    });
    return form;
  }

  // --- Connections ----------------------------------------------------------------------

  async function loadConnections() {
    const answer = await api(`${base}/connections`, { params: { limit: 20 }, signal });
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
  const reloadState = debounce(() => loadState({ keepEdits: true }).catch((e) => fail(e, stateNotice)), 300);
  const redrawLatest = coalesce(drawLatest);

  function onEvent(type, event) {
    if (type === 'lagged') {
      loadAll();
      return;
    }
    if (event.device !== id) return;
    if (type === 'telemetry') {
      let added = false;
      for (const p of event.points) {
        const known = latest.get(p.metric);
        if (!known) added = true;
        if (!known || p.ts >= known.ts) latest.set(p.metric, { ts: p.ts, value: p.value });
        const v = numeric(p.value);
        const chart = charts.get(p.metric);
        if (chart && v !== null) chart.add(p.ts, v);
      }
      redrawLatest();
      redrawCharts();
      if (added) {
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

  async function loadAll() {
    error.show(null);
    try {
      await Promise.all([loadDevice(), loadLatest()]);
    } catch (e) {
      fail(e);
      return false;
    }
    loadCharts();
    loadCommands().catch((e) => fail(e, commandNotice));
    loadState().catch((e) => fail(e, stateNotice));
    loadConnections().catch(fail);
    return true;
  }

  loadAll().then((ok) => {
    if (!ok || signal.aborted) return;
    follow({ device: id }, {
      signal,
      onEvent,
      onState(state) {
        liveState.textContent = { connecting: 'connecting…', live: 'live', retrying: 'reconnecting…' }[state];
        liveState.dataset.state = state;
      },
    });
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
