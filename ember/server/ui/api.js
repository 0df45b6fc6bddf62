// What the page asks of the server: ember's OpenAI endpoints and its conversation store (/v1/conversations).
// Same origin, so no CORS; the API key (when the server has one) lives in this browser's localStorage.

const KEY = 'ember.apiKey';

export class APIError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const apiKey = () => localStorage.getItem(KEY) || '';
export const setApiKey = (key) => (key ? localStorage.setItem(KEY, key) : localStorage.removeItem(KEY));

/** fetch with the key and JSON body; an answer that is not 2xx becomes an APIError with the server's message. */
export async function request(path, { method = 'GET', body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let res;
  try {
    res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new APIError(0, 'The server cannot be reached: is `ember serve` still running?', 'unreachable');
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    let code = null;
    try {
      const err = (await res.json()).error;
      message = err?.message || message;
      code = err?.code || null;
    } catch { /* not JSON: keep the status line */ }
    throw new APIError(res.status, message, code);
  }
  return res;
}

const json = async (path, opts) => (await request(path, opts)).json();

/** The JSON events of a server-sent-events response, until `data: [DONE]`. Any line ending (LF, CRLF, CR),
 * events split across network reads, several data lines joined by LF; a stream that ends without [DONE]
 * was cut off, and says so. */
export async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    const held = buf.endsWith('\r') ? '\r' : '';  // maybe half of a CRLF: wait for the next read
    const lines = (held ? buf.slice(0, -1) : buf).split(/\r\n|\r|\n/);
    buf = lines.pop() + held;
    for (const line of lines) {
      if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      else if (line === '' && data.length) {
        const payload = data.join('\n');
        data = [];
        if (payload === '[DONE]') return;
        yield JSON.parse(payload);
      }
    }
  }
  throw new APIError(0, 'The reply was cut off: the connection closed before it ended (is the server still running?)',
    'incomplete');
}

export const models = () => json('/v1/models');
export const cancel = (id) => request(`/v1/requests/${encodeURIComponent(id)}/cancel`, { method: 'POST' });

export const store = {
  list: (q) => json(`/v1/conversations?limit=200${q ? `&q=${encodeURIComponent(q)}` : ''}`),
  get: (id) => json(`/v1/conversations/${id}`),
  create: (body) => json('/v1/conversations', { method: 'POST', body }),
  append: (id, body) => json(`/v1/conversations/${id}/messages`, { method: 'POST', body }),
  update: (id, body) => json(`/v1/conversations/${id}`, { method: 'PATCH', body }),
  remove: (id) => json(`/v1/conversations/${id}`, { method: 'DELETE' }),
};
