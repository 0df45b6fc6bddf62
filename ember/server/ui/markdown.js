// Replies are Markdown from a model: untrusted. marked turns them into HTML with any raw HTML in them
// escaped (a reply that says <script> shows <script>), then DOMPurify removes whatever is still unsafe
// (javascript: links, event attributes). The page's Content-Security-Policy is the last line.
/* global marked, DOMPurify */
import { make } from './state.js';

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);

marked.use({ gfm: true, renderer: { html: ({ text }) => escapeHtml(text) } });

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {  // links open elsewhere and learn nothing of this page
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

const PURIFY = { USE_PROFILES: { html: true }, FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea'],
  FORBID_ATTR: ['style'] };

/** Render Markdown `text` into element `el`, with a copy button on each code block. */
export function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY);
  for (const pre of el.querySelectorAll('pre')) {
    const copy = make('button', { type: 'button', className: 'copy-code', text: 'Copy', label: 'Copy this code',
      onClick: () => copyText(pre.querySelector('code')?.textContent ?? pre.textContent, copy) });
    pre.append(copy);
  }
}

/** Copy to the clipboard and say so on the button for a moment. */
export async function copyText(text, button) {
  const label = button.textContent;
  try {
    if (navigator.clipboard) await navigator.clipboard.writeText(text);
    else legacyCopy(text);  // plain http to another machine: no Clipboard API there
    button.textContent = 'Copied';
  } catch {
    button.textContent = 'Copy failed';
  }
  setTimeout(() => { button.textContent = label; }, 1200);
}

function legacyCopy(text) {
  const area = make('textarea', { value: text, readOnly: true, className: 'visually-hidden' });
  document.body.append(area);
  area.select();
  const ok = document.execCommand('copy');
  area.remove();
  if (!ok) throw new Error('copy refused');
}
