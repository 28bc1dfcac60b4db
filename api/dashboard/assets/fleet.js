// The fleet: counts, and the devices in id order with their tags and presence, searched by
// id prefix and filtered by tags, a page at a time.
//
// The search uses the list's order (ids compared byte by byte): devices whose id starts with
// a prefix sort together from the prefix on, so the page asks for devices `after` the id
// that sorts just before the prefix and stops at the first that no longer starts with it.
// Tag filters go to the API (`tag=key:value`). The filter lives in the route
// (`#/?q=…&tag=…`), so a filtered view can be linked to. Presence is kept current from the
// live stream, and the page is loaded again each time the stream opens.

import { h, notice, replace } from './dom.js';
import { api, pooled } from './api.js';
import { follow, debounce } from './live.js';
import { ago, when } from './format.js';

const PAGE = 25;
/** The characters of a device id, in byte order, and its longest length. */
const ID_ALPHABET = '-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz';
const ID_MAX = 64;
const ID_PATTERN = /^[-.0-9A-Z_a-z]{1,64}$/;
/** Devices asked for at once while passing over those that sort before a prefix. */
const SKIP_PAGE = 1000;

function deviceLink(id) {
  return h('a', { href: `#/devices/${encodeURIComponent(id)}` }, id);
}

/** The greatest id that sorts before `prefix`, so that the list `after` it starts at the
 * prefix; null when none does (the list starts at the prefix anyway). `prefix` is made of
 * id characters. Its last character is lowered by one and followed by as many of the
 * greatest character as an id can hold; if it is the least character, it is dropped. */
export function before(prefix) {
  const head = prefix.slice(0, -1);
  const at = ID_ALPHABET.indexOf(prefix[prefix.length - 1]);
  if (at <= 0) return head || null;
  const last = ID_ALPHABET[ID_ALPHABET.length - 1];
  return head + ID_ALPHABET[at - 1] + last.repeat(ID_MAX - prefix.length);
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
  const feedError = notice();
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
    feedError,
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
    // One more than a page tells whether there is a next one. Devices that sort before the
    // prefix (none, when starting from its predecessor) are passed over in larger pages.
    let limit = PAGE + 1;
    for (;;) {
      const page = await api('/devices', { params: { limit, after: cursor, tag: tags }, signal });
      for (const d of page.devices) {
        if (prefix && !d.id.startsWith(prefix)) {
          if (d.id > prefix) return { devices: found, next: null };
          continue;
        }
        found.push(d);
        if (found.length > PAGE) return { devices: found.slice(0, PAGE), next: found[PAGE - 1].id };
      }
      if (!page.next) return { devices: found, next: null };
      cursor = page.next;
      if (!found.length) limit = SKIP_PAGE;
    }
  }

  let loads = 0;
  async function load(history) {
    const mine = ++loads;
    cursors = history;
    error.show(null);
    status.textContent = 'Loading…';
    try {
      if (prefix && !ID_PATTERN.test(prefix)) {
        // Not an id's beginning: no device can match, and the API would refuse the cursor.
        show(history, [], [], null);
        return;
      }
      const after = history.length ? history[history.length - 1] : (prefix ? before(prefix) : null);
      const { devices, next } = await fetchPage(after);
      if (mine !== loads) return;
      const presences = await pooled(devices.map((d) => () => api(`/devices/${encodeURIComponent(d.id)}/presence`, { signal }).catch(() => null)));
      if (mine !== loads) return;
      show(history, devices, presences, next);
    } catch (e) {
      if (e.name === 'AbortError' || mine !== loads) return;
      status.textContent = '';
      error.show(e.message);
    }
  }

  /** Shows a page of devices (page `history.length + 1`) and the pager. */
  function show(history, devices, presences, next) {
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
  }

  const refreshCounts = debounce(loadCounts, 300);
  follow({ type: 'presence' }, {
    signal,
    // Each time the stream opens: what it missed while closed is in what is loaded then.
    reload() {
      loadCounts();
      load(cursors);
    },
    onState(state, e) {
      if (state === 'failed') feedError.show(`Presence is not kept current: ${e.message}`);
    },
    onEvent(type, event) {
      if (type === 'lagged') {
        loadCounts();
        load(cursors);
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
}
