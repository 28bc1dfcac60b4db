// The JSON API under /api/v1, with the signed-in token as `Authorization: Bearer`.
//
// The token lives in sessionStorage: it lasts while the tab does and is not shared with
// other tabs. A 401 anywhere forgets it and sends the page back to sign-in; other errors
// are thrown as ApiError with the API's own message (`error.message`), for the page to show.

const TOKEN_KEY = 'tellus.token';
const BASE = '/api/v1';

/** An answer other than 2xx: the HTTP status, the API's stable code and its message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
  },
};

/** Raised once per 401: the app listens and shows sign-in. */
export const unauthorized = new EventTarget();

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value === null || value === undefined || value === '') continue;
    for (const v of Array.isArray(value) ? value : [value]) q.append(key, String(v));
  }
  const text = q.toString();
  return text ? `?${text}` : '';
}

/** The error an answer carries, in the API's shape when it has one. */
async function errorOf(response) {
  let code = 'http_error';
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not JSON: the status line says enough.
  }
  return new ApiError(response.status, code, message);
}

/** Sends a request; `token` overrides the session's (for signing in). */
export async function raw(path, { method = 'GET', params, body, signal, token, headers = {} } = {}) {
  const bearer = token ?? session.token();
  const init = { method, signal, headers: { Accept: 'application/json', ...headers } };
  if (bearer) init.headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`${BASE}${path}${query(params)}`, init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'Tellus cannot be reached; check that it is running.');
  }
  if (response.status === 401 && token === undefined) {
    session.clear();
    unauthorized.dispatchEvent(new Event('unauthorized'));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** A request whose answer is JSON (or nothing, for 204). */
export async function api(path, options) {
  const response = await raw(path, options);
  if (response.status === 204) return null;
  return response.json();
}

/** Who a token belongs to: `{id, name, role}`; `token` overrides the session's. */
export function whoami(token) {
  return api('/whoami', { token });
}

/** Whether a role may act (send commands, change state, acknowledge, switch rules). */
export function canOperate(role) {
  return role === 'operator' || role === 'admin';
}

/** Runs `tasks` (functions returning promises), at most `limit` at once, in order. */
export async function pooled(tasks, limit = 6) {
  const results = new Array(tasks.length);
  let next = 0;
  async function worker() {
    while (next < tasks.length) {
      const i = next++;
      results[i] = await tasks[i]();
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  return results;
}
