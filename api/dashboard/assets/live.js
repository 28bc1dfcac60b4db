// The live feed: `GET /api/v1/stream` read as server-sent events.
//
// EventSource cannot send an Authorization header, so the stream is read with fetch and a
// body reader, and its lines are parsed here (`event:` and `data:` fields, a blank line ends
// an event; comments, the server's keep-alives, start with `:`). A dropped stream is opened
// again after a backoff (1 s, doubling to 30 s, back to 1 s once a stream has opened);
// aborting the signal stops it for good.

import { raw, ApiError } from './api.js';

const FIRST_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30000;

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/** Splits a growing text into SSE events; returns what is left of the last, unended one. */
function parseEvents(buffer, onEvent) {
  let rest = buffer;
  let end;
  while ((end = rest.search(/\r?\n\r?\n/)) >= 0) {
    const block = rest.slice(0, end);
    rest = rest.slice(end + (rest[end] === '\r' ? 4 : 2));
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
 * `onEvent(type, data)` gets each event; `onState('connecting' | 'live' | 'retrying', error)`
 * says how the stream is doing. A `lagged` event means events were missed: reload.
 */
export async function follow(params, { signal, onEvent, onState = () => {} }) {
  let backoff = FIRST_BACKOFF_MS;
  while (!signal.aborted) {
    onState('connecting');
    try {
      const response = await raw('/stream', {
        params,
        signal,
        headers: { Accept: 'text/event-stream' },
      });
      onState('live');
      backoff = FIRST_BACKOFF_MS;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, onEvent);
      }
    } catch (e) {
      if (signal.aborted) return;
      // A revoked token ends the stream: the app is already on its way to sign-in.
      if (e instanceof ApiError && e.status === 401) return;
      onState('retrying', e);
    }
    if (signal.aborted) return;
    onState('retrying');
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
