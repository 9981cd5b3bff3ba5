// Live progress on "My files" (live.js follows the user's uploads wherever they are written).
// Each table row carries data-upload-id / data-offset / data-size; an event for a row updates
// its progress bar and text; a status change (complete, cancelled, …) asks for a reload of the
// list, since the row's actions change with it.

import { followProgress } from "./live.js";

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

function onEvent(table, status, event) {
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
}

const table = document.querySelector("table.files");
const status = document.getElementById("files-live-status");
if (table && status && table.querySelector("tr[data-status='uploading']")) {
  followProgress(
    (event) => onEvent(table, status, event),
    (live) => {
      table.dataset.live = String(live);
    },
  );
}
