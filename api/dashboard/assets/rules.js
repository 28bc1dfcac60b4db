// Rules: each with its trigger, condition and figures; an operator enables and disables
// them. Any rule can be tried over a device's last hour of stored telemetry
// (`POST /rules/test`, which changes nothing), as it is saved or as edited here, showing
// what it matched and every action it would have taken.

import { h, notice, replace, actionButton } from './dom.js';
import { api, canOperate } from './api.js';
import { when, json, parseJson } from './format.js';

const HOUR = 3600000;
/** The most matches and firings a dry run lists here. */
const SHOWN = 50;

/** The fields of a rule that make its spec (what `POST /rules/test` takes as `rule`). */
function specOf(rule) {
  const spec = {};
  for (const key of ['name', 'description', 'trigger', 'devices', 'condition', 'for', 'actions']) {
    if (rule[key] !== undefined) spec[key] = rule[key];
  }
  return spec;
}

function effectText(effect) {
  const { type, ...rest } = effect;
  return `${type || 'effect'} ${JSON.stringify(rest)}`;
}

function dryRunPanel(rule, signal) {
  const error = notice();
  const result = h('div', { class: 'dry-result', 'aria-live': 'polite' });
  const device = h('input', {
    id: `dry-device-${rule.id}`,
    required: true,
    autocomplete: 'off',
    value: rule.devices?.ids?.[0] || '',
    placeholder: 'sensor-01',
  });
  const spec = h('textarea', { id: `dry-spec-${rule.id}`, rows: 10, spellcheck: 'false' }, json(specOf(rule)));
  const run = h('button', { type: 'submit', class: 'primary' }, 'Run over the last hour');
  const form = h('form', { class: 'dry-run' },
    h('div', { class: 'field' }, h('label', { for: device.id }, 'Device'), device),
    h('div', { class: 'field' }, h('label', { for: spec.id }, 'Rule (edit to try a change; nothing is saved)'), spec),
    h('div', { class: 'field actions' }, run),
    error,
    result);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.show(null);
    run.disabled = true;
    try {
      const to = Date.now();
      const body = { rule: parseJson(spec.value, 'The rule'), device: device.value.trim(), from: to - HOUR, to };
      const r = await api('/rules/test', { method: 'POST', body, signal });
      const firings = r.firings.slice(0, SHOWN);
      const matches = r.matches.slice(0, SHOWN);
      replace(result,
        h('p', { class: 'dry-summary' },
          `Evaluated ${r.evaluated} reading${r.evaluated === 1 ? '' : 's'}: ${r.matches.length} match${r.matches.length === 1 ? '' : 'es'}, ${r.firings.length} firing${r.firings.length === 1 ? '' : 's'}.`,
          r.truncated ? ' (More happened than is reported.)' : ''),
        firings.length ? h('div', { class: 'table-wrap' }, h('table', {},
          h('caption', {}, `Firings${r.firings.length > SHOWN ? ` (first ${SHOWN})` : ''}`),
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'At'), h('th', { scope: 'col' }, 'Would have done'))),
          h('tbody', {}, firings.map((f) => h('tr', {},
            h('td', {}, when(f.at_ms)),
            h('td', {}, f.effects.map((e) => h('code', { class: 'json block' }, effectText(e))),
              f.errors.map((e) => h('div', { class: 'notice error' }, e)))))))) : null,
        matches.length ? h('div', { class: 'table-wrap' }, h('table', {},
          h('caption', {}, `Matches${r.matches.length > SHOWN ? ` (first ${SHOWN})` : ''}`),
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'At'), h('th', { scope: 'col' }, 'Outcome'))),
          h('tbody', {}, matches.map((m) => h('tr', {},
            h('td', {}, when(m.at_ms)),
            h('td', {}, m.outcome, m.error ? `: ${m.error}` : '')))))) : null);
    } catch (e) {
      if (e.name !== 'AbortError') error.show(e.message);
    } finally {
      run.disabled = false;
    }
  });
  return form;
}

export function render(root, { signal, role }) {
  const canAct = canOperate(role);
  const error = notice();
  const list = h('div', { class: 'rules', id: 'rules' });
  replace(root,
    h('h1', {}, 'Rules'),
    error,
    canAct ? null : h('p', { class: 'notice info' }, 'Your role (viewer) can try rules but not enable or disable them.'),
    list);

  function card(rule) {
    const f = rule.figures;
    const toggle = actionButton(rule.enabled ? 'Disable' : 'Enable', async () => {
      try {
        const changed = await api(`/rules/${encodeURIComponent(rule.id)}/${rule.enabled ? 'disable' : 'enable'}`, { method: 'POST', signal });
        el.replaceWith(card(changed));
      } catch (e) {
        if (e.name !== 'AbortError') error.show(e.message);
      }
    }, { class: 'small', disabled: !canAct });
    const dry = h('details', { class: 'dry' }, h('summary', {}, 'Dry run'));
    dry.addEventListener('toggle', () => {
      if (dry.open && dry.children.length === 1) dry.append(dryRunPanel(rule, signal));
    }, { signal });
    const el = h('article', { class: 'panel rule', dataset: { ruleId: rule.id, enabled: String(rule.enabled) } },
      h('header', {},
        h('h2', {}, rule.name),
        h('span', { class: `badge ${rule.enabled ? 'ok' : 'off'}` }, rule.enabled ? 'enabled' : 'disabled'),
        toggle),
      rule.description ? h('p', {}, rule.description) : null,
      h('dl', { class: 'facts' },
        h('div', {}, h('dt', {}, 'Trigger'), h('dd', {}, rule.trigger)),
        h('div', {}, h('dt', {}, 'Condition'), h('dd', {}, h('code', {}, rule.condition || 'always'))),
        rule.for ? h('div', {}, h('dt', {}, 'For'), h('dd', {}, rule.for)) : null,
        h('div', {}, h('dt', {}, 'Actions'), h('dd', {}, rule.actions.map((a) => a.type).join(', ') || 'none')),
        f ? h('div', {}, h('dt', {}, 'Since start'), h('dd', {}, `${f.evaluations} evaluated, ${f.matches} matched, ${f.fired} fired`)) : null),
      dry);
    return el;
  }

  async function load() {
    try {
      const answer = await api('/rules', { params: { limit: 1000 }, signal });
      replace(list, answer.rules.length ? answer.rules.map(card) : h('p', { class: 'empty' }, 'No rules yet. Create one with POST /api/v1/rules.'));
    } catch (e) {
      if (e.name !== 'AbortError') error.show(e.message);
    }
  }
  load();
}
