// The live feed: `GET /api/v1/stream` read as server-sent events.
//
// EventSource cannot send an Authorization header, so the stream is read with fetch and a
// body reader, and its lines are parsed here (`event:` and `data:` fields, a blank line ends
// an event; comments, the server's keep-alives, start with `:`). A dropped stream is opened
// again after a backoff (1 s, doubling to 30 s, back to 1 s once a stream has opened);
// aborting the signal stops it for good, and so does an answer that another try would only
// repeat (400, 401, 403, 404).
//
// The server does not replay what happened while no stream was open, so a page loads its
// data each time the stream opens (`reload`), after it is listening: nothing that happens
// between the two can be lost.

import { raw, ApiError } from './api.js';

const FIRST_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30000;
/** Answers that another try would only repeat. */
const FINAL_STATUSES = new Set([400, 401, 403, 404]);

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve();
      return;
    }
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}

/** Splits a growing text into SSE events; returns what is left of the last, unended one. */
function parseEvents(buffer, onEvent) {
  let rest = buffer;
  let end;
  while ((end = /\r?\n\r?\n/.exec(rest))) {
    const block = rest.slice(0, end.index);
    rest = rest.slice(end.index + end[0].length);
    let type = 'message';
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length) {
      let parsed;
      try {
        parsed = JSON.parse(data.join('\n'));
      } catch {
        continue;
      }
      onEvent(type, parsed);
    }
  }
  return rest;
}

/**
 * Follows the stream with `params` (`device`, `tag`, `type`) until `signal` aborts.
 *
 * `onEvent(type, data)` gets each event (one that throws is logged and the stream goes on).
 * `onState(state, error)` says how the stream is doing: `connecting`, `live`, `retrying`
 * (once per failure, with the error if there was one) or `failed` (for good, with the
 * error; a 401 stops it silently, the app is on its way to sign-in). `reload()` is called
 * each time the stream opens, to catch up with what happened while it was closed, and once
 * when the first try fails, so that the page shows something meanwhile. A `lagged` event
 * means events were missed: reload then too.
 */
export async function follow(params, { signal, onEvent, onState = () => {}, reload = () => {} }) {
  let backoff = FIRST_BACKOFF_MS;
  let loaded = false;
  const load = () => {
    loaded = true;
    try {
      reload();
    } catch (e) {
      console.error('reloading after the live feed opened:', e);
    }
  };
  const deliver = (type, data) => {
    try {
      onEvent(type, data);
    } catch (e) {
      console.error(`the live feed's ${type} event:`, e);
    }
  };
  const tell = (state, error) => {
    try {
      onState(state, error);
    } catch (e) {
      console.error(`the live feed's state ${state}:`, e);
    }
  };
  while (!signal.aborted) {
    tell('connecting');
    // Each try has its own controller, so that whatever ends it also closes its connection.
    const attempt = new AbortController();
    const stop = () => attempt.abort();
    signal.addEventListener('abort', stop, { once: true });
    let failure = null;
    try {
      const response = await raw('/stream', {
        params,
        signal: attempt.signal,
        headers: { Accept: 'text/event-stream' },
      });
      tell('live');
      backoff = FIRST_BACKOFF_MS;
      load();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, deliver);
      }
    } catch (e) {
      failure = e;
    } finally {
      signal.removeEventListener('abort', stop);
      attempt.abort();
    }
    if (signal.aborted) return;
    if (failure instanceof ApiError && FINAL_STATUSES.has(failure.status)) {
      // A revoked token: the app is already on its way to sign-in.
      if (failure.status === 401) return;
      tell('failed', failure);
      if (!loaded) load();
      return;
    }
    tell('retrying', failure);
    if (!loaded) load();
    await sleep(backoff, signal);
    backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
  }
}

/** Calls `fn` at most once per animation frame, however often it is asked to. */
export function coalesce(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fn();
    });
  };
}

/** Calls `fn` once, `ms` after the last of a burst of calls. */
export function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}
