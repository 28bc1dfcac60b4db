// The fleet: counts, and the devices in id order with their tags and presence, searched by
// id prefix and filtered by tags, a page at a time.
//
// The search uses the list's order: devices whose id starts with a prefix sort together
// right after it, so the page asks for devices `after` the prefix's predecessor and stops at
// the first that no longer starts with it. Tag filters go to the API (`tag=key:value`).
// The filter lives in the route (`#/?q=…&tag=…`), so a filtered view can be linked to.

import { h, notice, replace } from './dom.js';
import { api, pooled } from './api.js';
import { follow, debounce } from './live.js';
import { ago, when } from './format.js';

const PAGE = 25;

function deviceLink(id) {
  return h('a', { href: `#/devices/${encodeURIComponent(id)}` }, id);
}

/** The id that sorts just before `prefix`, so that `after` it the list starts at the prefix. */
function before(prefix) {
  return prefix.slice(0, -1) || null;
}

function presenceCell(presence) {
  if (!presence) return h('td', { 'data-label': 'State' }, '—');
  return h('td', { 'data-label': 'State' },
    h('span', { class: `badge ${presence.online ? 'ok' : 'off'}` }, presence.online ? 'online' : 'offline'));
}

export function render(root, { query, signal }) {
  const prefix = query.get('q') || '';
  const tags = query.getAll('tag');
  const error = notice();
  const counts = h('dl', { class: 'counts', 'aria-live': 'polite' });
  const body = h('tbody', { id: 'devices' });
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  const status = h('p', { class: 'hint', role: 'status' });

  const search = h('input', { id: 'search', type: 'search', name: 'q', value: prefix, placeholder: 'sensor-', autocomplete: 'off' });
  const tagInput = h('input', { id: 'tags', name: 'tags', value: tags.join(', '), placeholder: 'site:berlin, floor:2', autocomplete: 'off' });
  const form = h('form', { class: 'filters', role: 'search' },
    h('div', { class: 'field' }, h('label', { for: 'search' }, 'Device id starts with'), search),
    h('div', { class: 'field' }, h('label', { for: 'tags' }, 'Tags (key:value, comma-separated)'), tagInput),
    h('div', { class: 'field actions' },
      h('button', { type: 'submit', class: 'primary' }, 'Filter'),
      h('a', { class: 'button', href: '#/' }, 'Clear')));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    if (search.value.trim()) q.set('q', search.value.trim());
    for (const tag of tagInput.value.split(',').map((t) => t.trim()).filter(Boolean)) q.append('tag', tag);
    const next = `#/${q.toString() ? `?${q}` : ''}`;
    if (location.hash === next) load([]);
    else location.hash = next;
  });

  replace(root,
    h('h1', {}, 'Fleet'),
    counts,
    error,
    form,
    h('div', { class: 'table-wrap' },
      h('table', { class: 'devices responsive' },
        h('caption', { class: 'visually-hidden' }, 'Devices'),
        h('thead', {}, h('tr', {},
          h('th', { scope: 'col' }, 'Device'),
          h('th', { scope: 'col' }, 'Tags'),
          h('th', { scope: 'col' }, 'State'),
          h('th', { scope: 'col' }, 'Last seen'))),
        body)),
    status,
    pager);

  const rows = new Map();
  // Cursors of the pages before this one (`after` values), for "Previous".
  let cursors = [];

  async function loadCounts() {
    try {
      const c = await api('/presence', { signal });
      replace(counts,
        h('div', {}, h('dt', {}, 'Devices'), h('dd', { id: 'count-devices' }, c.devices)),
        h('div', { class: 'ok' }, h('dt', {}, 'Online'), h('dd', { id: 'count-online' }, c.online)),
        h('div', { class: 'off' }, h('dt', {}, 'Offline'), h('dd', { id: 'count-offline' }, Math.max(c.devices - c.online, 0))));
    } catch (e) {
      if (e.name !== 'AbortError') error.show(e.message);
    }
  }

  function tagChip(key, value) {
    const filter = `${key}:${value}`;
    const q = new URLSearchParams(query);
    if (!tags.includes(filter)) q.append('tag', filter);
    return h('a', { class: 'chip', href: `#/?${q}`, title: `Only devices with ${filter}` }, filter);
  }

  function row(d, presence) {
    const tr = h('tr', { dataset: { device: d.id } },
      h('th', { scope: 'row', 'data-label': 'Device' }, deviceLink(d.id),
        d.status === 'disabled' ? h('span', { class: 'badge warn' }, 'disabled') : null),
      h('td', { 'data-label': 'Tags', class: 'tags' }, Object.entries(d.tags).map(([k, v]) => tagChip(k, v))),
      presenceCell(presence),
      h('td', { 'data-label': 'Last seen', title: presence ? when(presence.last_seen_ms) : '' },
        presence ? (presence.online ? 'now' : ago(presence.last_seen_ms)) : '—'));
    return tr;
  }

  /** Up to a page of devices after `after` that match the prefix, and the next cursor. */
  async function fetchPage(after) {
    const found = [];
    let cursor = after;
    // Devices sorting before the prefix are skipped; a few pages of them at most.
    for (let round = 0; round < 20; round++) {
      const page = await api('/devices', { params: { limit: PAGE, after: cursor, tag: tags }, signal });
      for (const d of page.devices) {
        if (prefix && d.id > prefix && !d.id.startsWith(prefix)) return { devices: found, next: null };
        if (prefix && !d.id.startsWith(prefix)) continue;
        found.push(d);
        if (found.length === PAGE) return { devices: found, next: d.id };
      }
      if (!page.next) return { devices: found, next: null };
      cursor = page.next;
    }
    return { devices: found, next: cursor };
  }

  async function load(history) {
    cursors = history;
    error.show(null);
    status.textContent = 'Loading…';
    try {
      const after = history.length ? history[history.length - 1] : (prefix ? before(prefix) : null);
      const { devices, next } = await fetchPage(after);
      const presences = await pooled(devices.map((d) => () => api(`/devices/${encodeURIComponent(d.id)}/presence`, { signal }).catch(() => null)));
      rows.clear();
      replace(body, devices.map((d, i) => {
        const tr = row(d, presences[i]);
        rows.set(d.id, { device: d, presence: presences[i], tr });
        return tr;
      }));
      if (!devices.length) {
        replace(body, h('tr', {}, h('td', { colspan: 4, class: 'empty' },
          prefix || tags.length ? 'No device matches this filter.' : 'No devices yet. Register one with POST /api/v1/devices.')));
      }
      status.textContent = devices.length ? `Page ${history.length + 1}: ${devices.length} device${devices.length === 1 ? '' : 's'}.` : '';
      const prev = h('button', { type: 'button', disabled: history.length === 0 }, '← Previous');
      prev.addEventListener('click', () => load(history.slice(0, -1)));
      const nextButton = h('button', { type: 'button', disabled: !next }, 'Next →');
      nextButton.addEventListener('click', () => load([...history, next]));
      replace(pager, prev, nextButton);
    } catch (e) {
      if (e.name === 'AbortError') return;
      status.textContent = '';
      error.show(e.message);
    }
  }

  const refreshCounts = debounce(loadCounts, 300);
  follow({ type: 'presence' }, {
    signal,
    onEvent(type, event) {
      if (type === 'lagged') {
        loadCounts();
        return;
      }
      if (type !== 'presence') return;
      refreshCounts();
      const known = rows.get(event.device);
      if (!known) return;
      known.presence = {
        ...(known.presence || {}),
        online: event.online,
        last_seen_ms: event.at_ms,
      };
      const tr = row(known.device, known.presence);
      known.tr.replaceWith(tr);
      known.tr = tr;
    },
  });
  // "Last seen 12 s ago" ages while the page is open.
  const timer = setInterval(() => {
    for (const known of rows.values()) {
      const tr = row(known.device, known.presence);
      known.tr.replaceWith(tr);
      known.tr = tr;
    }
  }, 15000);
  signal.addEventListener('abort', () => clearInterval(timer));

  loadCounts();
  load([]);
}
