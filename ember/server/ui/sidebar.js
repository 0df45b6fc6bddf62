// The conversation list from the store: open, search, rename, delete.
import { store } from './api.js';
import { $, busy, setStatus, state, when } from './state.js';

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
    const none = document.createElement('li');
    none.className = 'muted none';
    none.textContent = q ? 'No conversation mentions that.' : 'No saved conversations yet.';
    list.append(none);
  }
}

export function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(refreshList, 200);
}

function item(c) {
  const li = document.createElement('li');
  li.className = 'conv';
  li.dataset.id = c.id;
  const title = c.title || 'Untitled';
  if (state.conv?.id === c.id) li.classList.add('current');
  const open = document.createElement('button');
  open.type = 'button';
  open.className = 'open';
  if (state.conv?.id === c.id) open.setAttribute('aria-current', 'true');
  const name = document.createElement('span');
  name.className = 'name';
  name.textContent = title;
  const info = document.createElement('small');
  info.className = 'muted';
  info.textContent = `${when(c.updated)} · ${c.message_count} message${c.message_count === 1 ? '' : 's'}`;
  open.append(name, info);
  open.addEventListener('click', () => hooks.open(c.id));
  li.append(open, button('✎', `Rename “${title}”`, 'rename', () => rename(li, c)),
    button('✕', `Delete “${title}”`, 'delete', () => remove(c)));
  return li;
}

function button(text, label, cls, fn) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = `icon ${cls}`;
  b.textContent = text;
  b.setAttribute('aria-label', label);
  b.title = label;
  b.addEventListener('click', fn);
  return b;
}

function rename(li, c) {
  const input = document.createElement('input');
  input.value = c.title;
  input.setAttribute('aria-label', 'New title (Enter saves, Esc cancels)');
  input.maxLength = 200;
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
    if (ev.isComposing || ev.keyCode === 229) return;
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
