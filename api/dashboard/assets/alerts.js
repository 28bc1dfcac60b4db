// Alerts that rules raised: the open ones first (active, then acknowledged), then the
// recently cleared; an operator acknowledges an active one. Kept current from the stream's
// `alert` events, and loaded again each time the stream opens (it does not replay what
// happened while it was closed).

import { h, notice, replace, actionButton } from './dom.js';
import { api, canOperate } from './api.js';
import { follow, debounce } from './live.js';
import { ago, when } from './format.js';

const SEVERITY_CLASS = { critical: 'bad', warning: 'warn', info: 'info' };

export function render(root, { signal, role }) {
  const canAct = canOperate(role);
  const error = notice();
  const feedError = notice();
  const openBody = h('tbody', { id: 'open-alerts' });
  const recentBody = h('tbody', { id: 'recent-alerts' });
  const ruleNames = new Map();

  const table = (body, caption) => h('div', { class: 'table-wrap' }, h('table', { class: 'responsive' },
    h('caption', { class: 'visually-hidden' }, caption),
    h('thead', {}, h('tr', {}, ['Severity', 'Device', 'Rule', 'Message', 'Raised', 'Status', ''].map((t) => h('th', { scope: 'col' }, t)))),
    body));
  replace(root,
    h('h1', {}, 'Alerts'),
    feedError,
    error,
    canAct ? null : h('p', { class: 'notice info' }, 'Your role (viewer) can see alerts but not acknowledge them.'),
    h('section', { class: 'panel', 'aria-labelledby': 'open-title' }, h('h2', { id: 'open-title' }, 'Open'), table(openBody, 'Open alerts')),
    h('section', { class: 'panel', 'aria-labelledby': 'recent-title' }, h('h2', { id: 'recent-title' }, 'Cleared recently'), table(recentBody, 'Cleared alerts')));

  function row(a) {
    const ack = canAct && a.status === 'active'
      ? actionButton('Acknowledge', async () => {
        try {
          await api(`/alerts/${encodeURIComponent(a.id)}/acknowledge`, { method: 'POST', signal });
          await load();
        } catch (e) {
          if (e.name !== 'AbortError') error.show(e.message);
        }
      }, { class: 'small' })
      : null;
    const status = a.status === 'cleared' && a.cleared_reason ? `cleared (${a.cleared_reason})` : a.status;
    return h('tr', { dataset: { alertId: a.id, status: a.status } },
      h('td', { 'data-label': 'Severity' }, h('span', { class: `badge ${SEVERITY_CLASS[a.severity] || 'info'}` }, a.severity)),
      h('th', { scope: 'row', 'data-label': 'Device' }, h('a', { href: `#/devices/${encodeURIComponent(a.device)}` }, a.device)),
      h('td', { 'data-label': 'Rule' }, ruleNames.get(a.rule) || a.rule),
      h('td', { 'data-label': 'Message' }, a.message),
      h('td', { 'data-label': 'Raised', title: when(a.raised_at_ms) }, ago(a.raised_at_ms)),
      h('td', { 'data-label': 'Status' }, status),
      h('td', {}, ack));
  }

  const empty = (text) => h('tr', {}, h('td', { colspan: 7, class: 'empty' }, text));
  const order = { active: 0, acknowledged: 1 };

  let loads = 0;
  async function load() {
    const mine = ++loads;
    try {
      const [open, recent, rules] = await Promise.all([
        api('/alerts', { params: { open: true, limit: 200 }, signal }),
        api('/alerts', { params: { status: 'cleared', limit: 50 }, signal }),
        ruleNames.size ? null : api('/rules', { params: { limit: 1000 }, signal }),
      ]);
      if (mine !== loads) return;
      if (rules) for (const r of rules.rules) ruleNames.set(r.id, r.name);
      const opened = [...open.alerts].sort((a, b) => order[a.status] - order[b.status] || b.raised_at_ms - a.raised_at_ms);
      replace(openBody, opened.length ? opened.map(row) : empty('No open alerts.'));
      replace(recentBody, recent.alerts.length ? recent.alerts.map(row) : empty('None.'));
      error.show(null);
    } catch (e) {
      if (e.name !== 'AbortError' && mine === loads) error.show(e.message);
    }
  }

  const reload = debounce(load, 300);
  follow({ type: 'alert' }, {
    signal,
    onEvent: reload,
    reload: load,
    onState(state, e) {
      if (state === 'failed') feedError.show(`Alerts are not kept current: ${e.message}`);
    },
  });
}
