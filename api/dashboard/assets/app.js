// The dashboard's entry point: the header, sign-in, and the hash routes.
//
// Routes: `#/` the fleet, `#/devices/<id>` one device, `#/alerts`, `#/rules`. Each view is
// rendered into <main> with an AbortSignal that aborts when the route changes, which stops
// its live streams and timers. Without a token, sign-in is shown in place of any route and
// the route is rendered once signed in, so links survive it.

import { session, unauthorized, whoami } from './api.js';
import * as signin from './signin.js';
import * as fleet from './fleet.js';
import * as device from './device.js';
import * as alerts from './alerts.js';
import * as rules from './rules.js';

const main = document.getElementById('view');
const top = document.getElementById('top');
const identityEl = document.getElementById('identity');

let identity = null;
let current = null;
/** Counts route changes (and sign-in shown): a render that awaited and is no longer the
 * newest stops there, so that an older page cannot replace a newer one. */
let routeSeq = 0;
/** Whether sign-in is showing: a burst of 401s shows it once. */
let signingIn = false;

const ROUTES = [
  { pattern: /^\/?$/, view: fleet, nav: 'fleet', title: 'Fleet' },
  { pattern: /^\/devices\/([^/]+)$/, view: device, nav: 'fleet', title: 'Device' },
  { pattern: /^\/alerts$/, view: alerts, nav: 'alerts', title: 'Alerts' },
  { pattern: /^\/rules$/, view: rules, nav: 'rules', title: 'Rules' },
];

function showSignin(reason) {
  routeSeq += 1;
  signingIn = true;
  current?.abort();
  current = null;
  identity = null;
  top.hidden = true;
  document.title = 'Sign in · Tellus';
  signin.render(main, {
    reason,
    onSignedIn(who) {
      signingIn = false;
      identity = who;
      route();
    },
  });
}

function showIdentity() {
  identityEl.textContent = `${identity.name} · ${identity.role}`;
  identityEl.dataset.role = identity.role;
  top.hidden = false;
}

async function route() {
  const seq = ++routeSeq;
  current?.abort();
  current = null;
  if (!session.token()) {
    showSignin();
    return;
  }
  if (!identity) {
    let who;
    try {
      who = await whoami();
    } catch (e) {
      if (seq !== routeSeq) return;
      if (e.status === 401) return; // the unauthorized handler shows sign-in
      main.replaceChildren();
      main.append(Object.assign(document.createElement('p'), { className: 'notice error', role: 'alert', textContent: e.message }));
      return;
    }
    // Another route change (or sign-in) came while this one waited: that one renders.
    if (seq !== routeSeq) return;
    identity = who;
  }
  showIdentity();
  const [path, query = ''] = location.hash.replace(/^#/, '').split('?');
  const match = ROUTES.map((r) => ({ r, m: r.pattern.exec(path) })).find((x) => x.m);
  let params = [];
  try {
    if (match) params = match.m.slice(1).map(decodeURIComponent);
  } catch {
    // A malformed `%` escape names no page: the fleet instead, in place of the bad entry.
    location.replace('#/');
    return;
  }
  for (const link of top.querySelectorAll('[data-nav]')) {
    if (match && link.dataset.nav === match.r.nav) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const controller = new AbortController();
  current = controller;
  main.replaceChildren();
  if (!match) {
    main.append(Object.assign(document.createElement('p'), { className: 'notice error', role: 'alert', textContent: `There is no page ${path}.` }));
    return;
  }
  document.title = `${params[0] || match.r.title} · Tellus`;
  match.r.view.render(main, {
    params,
    query: new URLSearchParams(query),
    signal: controller.signal,
    role: identity.role,
  });
}

document.getElementById('signout').addEventListener('click', () => {
  session.clear();
  showSignin('Signed out.');
});
unauthorized.addEventListener('unauthorized', () => {
  if (signingIn) return;
  showSignin('The token was refused (it may have been revoked); sign in again.');
});
window.addEventListener('hashchange', () => {
  route();
  main.focus({ preventScroll: true });
  window.scrollTo(0, 0);
});
route();
