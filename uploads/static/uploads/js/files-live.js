// Live progress on "My files": follows the signed-in user's uploads through /ws/progress/
// (docs/protocol.md, section 8), wherever they are written — another tab, a script, another
// server process. Each table row carries data-upload-id / data-offset / data-size; an event
// for a row updates its progress bar and text; a status change (complete, cancelled, …) asks
// for a reload of the list, since the row's actions change with it. Best effort: the page's
// figures stay the server's own on every reload.

const RECONNECT_DELAYS = [1000, 3000, 5000, 10000];

function percent(offset, size) {
  return size > 0 ? Math.floor((offset * 100) / size) : 0;
}

function bytes(value) {
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} bytes` : `${value.toFixed(1)} ${units[unit]}`;
}

function updateRow(row, event) {
  row.dataset.offset = String(event.offset);
  const bar = row.querySelector("progress.upload-progress");
  const text = row.querySelector(".progress-text");
  if (bar) {
    bar.value = event.offset;
    bar.textContent = `${percent(event.offset, event.size)} %`;
  }
  if (text) {
    text.textContent = `${percent(event.offset, event.size)} % · ${bytes(event.offset)} of ${bytes(event.size)}`;
  }
}

function connect(table, status, attempt = 0) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${window.location.host}/ws/progress/`);
  socket.addEventListener("open", () => {
    attempt = 0;
    table.dataset.live = "true";
  });
  socket.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (event.type !== "progress") {
      return;
    }
    const row = table.querySelector(`tr[data-upload-id="${CSS.escape(event.id)}"]`);
    if (!row) {
      return; // an upload this page does not show (another page of the list, or a new one)
    }
    if (event.status !== row.dataset.status) {
      row.dataset.status = event.status;
      status.textContent = "An upload changed state: reload the page to see its actions.";
    }
    if (event.status === "uploading") {
      updateRow(row, event);
    }
  });
  socket.addEventListener("close", (closed) => {
    table.dataset.live = "false";
    if (closed.code === 4401) {
      return; // signed out
    }
    const delay = RECONNECT_DELAYS[Math.min(attempt, RECONNECT_DELAYS.length - 1)];
    window.setTimeout(() => connect(table, status, attempt + 1), delay);
  });
}

const table = document.querySelector("table.files");
const status = document.getElementById("files-live-status");
if (table && status && table.querySelector("tr[data-status='uploading']")) {
  connect(table, status);
}
