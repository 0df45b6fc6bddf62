// The conversation list from the store: open, search, rename, delete.
import { store } from './api.js';
import { $, busy, composing, make, setStatus, state, when } from './state.js';

const hooks = { open: () => {}, closed: () => {} };  // set by app.js

export function onOpen(fn) { hooks.open = fn; }
export function onDeleted(fn) { hooks.closed = fn; }

let searchTimer = null;
let shown = 0;  // answers older than the newest request are dropped (search as you type)

export async function refreshList(focus = null) {
  const ticket = ++shown;
  const q = $('search').value.trim();
  let data;
  try {
    ({ data } = await store.list(q));
  } catch (e) {
    if (e.status !== 401) setStatus(`The conversation list cannot be read: ${e.message}`, 'error');
    return;
  }
  if (ticket !== shown) return;
  const list = $('conversations');
  list.replaceChildren(...data.map(item));
  if (focus) list.querySelector(focus)?.focus();  // the element that had focus was rebuilt
  if (!data.length) {
    list.append(make('li', { className: 'muted none',
      text: q ? 'No conversation mentions that.' : 'No saved conversations yet.' }));
  }
}

export function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(refreshList, 200);
}

function item(c) {
  const title = c.title || 'Untitled';
  const current = state.conv?.id === c.id;
  const count = `${c.message_count} message${c.message_count === 1 ? '' : 's'}`;
  const open = make('button', { type: 'button', className: 'open', onClick: () => hooks.open(c.id) },
    make('span', { className: 'name', text: title }), make('small', { className: 'muted', text: `${when(c.updated)} · ${count}` }));
  if (current) open.setAttribute('aria-current', 'true');
  const icon = (text, label, cls, onClick) => make('button', { type: 'button', className: `icon ${cls}`, text, label,
    title: label, onClick });
  const li = make('li', { className: current ? 'conv current' : 'conv' }, open,
    icon('✎', `Rename “${title}”`, 'rename', () => rename(li, c)), icon('✕', `Delete “${title}”`, 'delete', () => remove(c)));
  li.dataset.id = c.id;
  return li;
}

function rename(li, c) {
  const input = make('input', { value: c.title, maxLength: 200, label: 'New title (Enter saves, Esc cancels)' });
  let done = false;
  const finish = async (keep) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (keep && title && title !== c.title) {
      try {
        const updated = await store.update(c.id, { title });
        if (state.conv?.id === c.id) {
          state.conv.title = updated.title;
          $('title').textContent = updated.title;
        }
      } catch (e) {
        setStatus(`Not renamed: ${e.message}`, 'error');
      }
    }
    refreshList(`li[data-id="${c.id}"] .rename`);
  };
  input.addEventListener('keydown', (ev) => {
    if (composing(ev)) return;
    if (ev.key === 'Enter') finish(true);
    if (ev.key === 'Escape') { ev.stopPropagation(); finish(false); }
  });
  input.addEventListener('blur', () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

async function remove(c) {
  if (state.conv?.id === c.id && busy()) return;
  if (!confirm(`Delete “${c.title || 'Untitled'}”? This cannot be undone.`)) return;
  try {
    await store.remove(c.id);
  } catch (e) {
    if (e.status !== 404) { setStatus(`Not deleted: ${e.message}`, 'error'); return; }
  }
  if (state.conv?.id === c.id) hooks.closed();
  refreshList();
  $('search').focus();  // the button that had focus is gone
}
