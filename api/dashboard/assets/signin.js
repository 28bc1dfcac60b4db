// Sign-in: an API token, checked with the server before it is kept.

import { h, notice } from './dom.js';
import { session, whoami } from './api.js';

/** Renders the form; `onSignedIn(identity)` runs once a token is accepted. */
export function render(root, { reason, onSignedIn }) {
  const error = notice();
  const input = h('input', {
    id: 'token',
    name: 'token',
    type: 'password',
    autocomplete: 'off',
    spellcheck: 'false',
    required: true,
    'aria-describedby': 'token-help',
  });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'card signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to Tellus'),
    reason ? h('p', { class: 'notice info', role: 'status' }, reason) : null,
    h('label', { for: 'token' }, 'API token'),
    input,
    h('p', { id: 'token-help', class: 'hint' },
      'Paste an API token. The admin token is in ', h('code', {}, '<data dir>/admin.token'),
      '. It is kept only in this tab until you sign out.'),
    error,
    submit);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    submit.disabled = true;
    error.show(null);
    try {
      const identity = await whoami(token);
      session.set(token);
      onSignedIn(identity);
    } catch (e) {
      error.show(e.status === 401 ? 'That token is not valid.' : e.message);
      input.select();
    } finally {
      submit.disabled = false;
    }
  });
  root.replaceChildren(form);
  input.focus();
}
