// Follows the signed-in user's uploads through /ws/progress/ (docs/protocol.md, section 8),
// wherever they are written: another tab, a script, another server process. Shared by
// "My files" and the upload page. Best effort: a page's figures are the server's own on
// every load, and the socket reconnects after a drop (not after 4401: signed out).

const RECONNECT_DELAYS = [1000, 3000, 5000, 10000];
const SIGNED_OUT = 4401;

/**
 * Calls onEvent({id, offset, size, status}) for every progress event, and onLive(true/false)
 * as the socket opens and closes.
 */
export function followProgress(onEvent, onLive = () => {}, attempt = 0) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${window.location.host}/ws/progress/`);
  socket.addEventListener("open", () => {
    attempt = 0;
    onLive(true);
  });
  socket.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "progress") onEvent(event);
  });
  socket.addEventListener("close", (closed) => {
    onLive(false);
    if (closed.code === SIGNED_OUT) return;
    const delay = RECONNECT_DELAYS[Math.min(attempt, RECONNECT_DELAYS.length - 1)];
    window.setTimeout(() => followProgress(onEvent, onLive, attempt + 1), delay);
  });
}
