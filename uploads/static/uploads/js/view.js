// The uploader's DOM: one row per queued file, the total, the list of unfinished uploads. No logic of its own.

import { describe } from "./messages.js";
import { formatBytes, formatDuration, percent } from "./progress.js";

const STATUS_WORDS = {
  checking: "Checking…",
  queued: "Queued",
  connecting: "Connecting…",
  uploading: "Uploading",
  finishing: "Finishing…",
  retrying: "Reconnecting…",
  waiting: "Waiting for a free slot",
  paused: "Paused",
  complete: "Complete",
  failed: "Failed",
  cancelled: "Cancelled",
};

// Failures that pressing Resume can get past (the message says so), the upload still being there.
const RESUMABLE_FAILURES = new Set([
  "gave_up",
  "unauthenticated",
  "http_401",
  "http_403",
  "permission_denied",
  "protocol_error",
  "size_exceeded",
]);

// An unfinished upload counts as "being uploaded elsewhere" this long after its last progress event.
const ELSEWHERE_MS = 5000;

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

export class UploaderView {
  constructor(root, limits) {
    this.root = root;
    this.limits = limits;
    this.list = root.querySelector("#upload-list");
    this.totalBar = root.querySelector("#total-progress");
    this.totalText = root.querySelector("#total-status");
    this.unfinished = root.querySelector("#unfinished");
    this.unfinishedList = root.querySelector("#unfinished-list");
    this.rows = new Map();
  }

  /** A row for a new item; `actions` has pause/resume/cancel callbacks. */
  addRow(item, actions) {
    const row = element("li", { class: "upload", "data-key": String(item.key) });
    const head = element("div", { class: "upload-head" });
    head.append(
      element("span", { class: "upload-name" }, item.name),
      element("span", { class: "upload-size" }, formatBytes(item.size)),
    );
    const bar = element("progress", { max: "100", value: "0", "aria-label": `Progress of ${item.name}` });
    const status = element("p", { class: "upload-status", "aria-live": "polite" });
    const rate = element("p", { class: "upload-rate" });
    const message = element("p", { class: "upload-message", role: "status" });
    const digest = element("p", { class: "upload-sha256", hidden: "" });
    const buttons = element("div", { class: "upload-actions" });
    for (const [action, label] of [["pause", "Pause"], ["resume", "Resume"], ["cancel", "Cancel"]]) {
      const attributes = { type: "button", "data-action": action, "aria-label": `${label} ${item.name}` };
      const button = element("button", attributes, label);
      button.addEventListener("click", () => actions[action](item));
      buttons.append(button);
    }
    row.append(head, bar, status, rate, message, digest, buttons);
    this.list.append(row);
    this.rows.set(item, { row, bar, status, rate, message, digest, buttons, lastStatusText: "" });
    this.render(item);
  }

  render(item) {
    const parts = this.rows.get(item);
    if (!parts) return;
    const { row, bar, status, rate, message, digest, buttons } = parts;
    // 100 % only once the server has verified and stored the file, not when the last byte went out.
    const done = item.status === "complete" ? 100 : Math.min(99, percent(item.offset, item.size));
    row.dataset.status = item.status;
    row.dataset.offset = String(item.offset);
    if (item.serverOffset !== null) row.dataset.serverOffset = String(item.serverOffset);
    if (item.uploadId) row.dataset.uploadId = item.uploadId;
    if (item.resumedFrom !== null) row.dataset.resumedFrom = String(item.resumedFrom);
    bar.value = done;
    // Only the status words and whole percents are live: a screen reader should not hear every progress event.
    const statusText = `${STATUS_WORDS[item.status] ?? item.status} · ${done} %`;
    if (statusText !== parts.lastStatusText) {
      status.textContent = statusText;
      parts.lastStatusText = statusText;
    }
    const { speed, eta } = item.meter.reading();
    rate.textContent =
      item.status === "uploading" && speed !== null
        ? `${formatBytes(speed)}/s${eta !== null ? ` · about ${formatDuration(eta)} left` : ""}`
        : item.resumedFrom !== null && item.status !== "complete"
          ? `Continuing from ${formatBytes(item.resumedFrom)}`
          : "";
    message.textContent = item.message ? describe(item.message, item, this.limits) : "";
    row.classList.toggle("has-error", item.status === "failed");
    if (item.sha256) {
      digest.hidden = false;
      digest.replaceChildren("sha256 (from the server): ", element("code", {}, item.sha256));
    }
    const can = {
      pause: ["queued", "connecting", "uploading", "finishing", "retrying", "waiting"].includes(item.status),
      resume:
        item.status === "paused" || (item.status === "failed" && RESUMABLE_FAILURES.has(item.message?.code)),
      cancel: !item.finished,
    };
    for (const button of buttons.querySelectorAll("button")) button.hidden = !can[button.dataset.action];
  }

  renderTotal(totals) {
    const allComplete = totals.count > 0 && totals.complete === totals.count;
    const done = allComplete ? 100 : Math.min(99, percent(totals.done, totals.size));
    this.totalBar.value = done;
    const bytes = `${formatBytes(totals.done)} of ${formatBytes(totals.size)}`;
    this.totalText.textContent = totals.count
      ? `${totals.complete} of ${totals.count} files complete · ${bytes} (${done} %)`
      : "No files chosen yet.";
  }

  /** The server's unfinished uploads: choose a file again to continue it. */
  renderUnfinished(uploads) {
    this.unfinishedList.replaceChildren(
      ...uploads.map((upload) => {
        // Moving elsewhere means events within the last few seconds (another tab, a script).
        const elsewhere = upload.movedAt !== undefined && Date.now() - upload.movedAt < ELSEWHERE_MS;
        const entry = element("li", {
          "data-upload-id": upload.id,
          "data-offset": String(upload.offset),
          "data-elsewhere": String(elsewhere),
        });
        const where = `${percent(upload.offset, upload.size)} % (${formatBytes(upload.offset)} of ${formatBytes(upload.size)})`;
        entry.append(
          element("strong", {}, upload.filename),
          elsewhere
            ? ` is being uploaded in another tab or program: ${where}.`
            : ` is unfinished at ${where} — choose it again to continue.`,
        );
        return entry;
      }),
    );
    this.unfinished.hidden = uploads.length === 0;
  }

  announce(text) {
    this.root.querySelector("#uploader-notice").textContent = text;
  }
}
