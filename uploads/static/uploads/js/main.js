// The upload page's entry point: reads the page's settings, wires the picker, drop zone, buttons and resume.

import { followProgress } from "./live.js";
import { UploadQueue } from "./queue.js";
import { fingerprintOf, resumeStore } from "./resume.js";
import { Api } from "./transport.js";
import { UploaderView } from "./view.js";

const root = document.querySelector("#uploader");
const limits = {
  slots: Number(root.dataset.slotLimit),
  maxFileSize: Number(root.dataset.maxFileSize),
};
const api = new Api({ listUrl: root.dataset.apiUrl, tusUrl: root.dataset.tusUrl, csrfToken: root.dataset.csrfToken });
const queue = new UploadQueue({ api, limit: limits.slots });
const view = new UploaderView(root, limits);
// The server's unfinished uploads (loaded at start): a chosen file may continue one of them.
let unfinished = [];
const unfinishedLoaded = loadUnfinished();

const actions = {
  pause: (item) => queue.pause(item),
  resume: (item) => queue.resume(item),
  cancel: (item) => {
    if (confirm(`Cancel the upload of ${item.name}? The bytes sent so far are deleted.`)) queue.cancel(item);
  },
};

queue.addEventListener("added", (event) => {
  const item = event.detail;
  view.addRow(item, actions);
  item.addEventListener("change", () => view.render(item));
});
queue.addEventListener("change", () => view.renderTotal(queue.totals()));

/** The server's upload this file continues, or null: only ever one whose fingerprint matches. */
async function resumable(item) {
  await unfinishedLoaded;
  const known = resumeStore.get(item.fingerprint);
  const listed = unfinished.find((upload) => upload.fingerprint === item.fingerprint && upload.size === item.size);
  const candidate = known ?? listed?.id;
  if (!candidate) return null;
  try {
    const upload = await api.get(candidate);
    if (upload.status === "uploading" && upload.fingerprint === item.fingerprint && upload.size === item.size) {
      return upload;
    }
  } catch (refusal) {
    // The anchors' rule: a 4xx on the resume check drops the entry and starts over; anything else
    // (network, 5xx) is not proof the upload is gone, so let the transfer's retries find out.
    if (!(refusal.status >= 400 && refusal.status < 500)) return { id: candidate, offset: 0 };
  }
  resumeStore.drop(item.fingerprint);
  return null;
}

async function addFile(file) {
  const item = queue.add(file);
  try {
    item.fingerprint = await fingerprintOf(file);
  } catch {
    item.set({ status: "failed", message: { code: "file_unreadable" } });
    return;
  }
  const twin = queue.items.find((other) => other !== item && other.fingerprint === item.fingerprint && !other.finished);
  if (twin) {
    // Two transfers of one file would fight over one upload (the server lets one writer in at a time).
    item.set({ status: "failed", message: { code: "duplicate" } });
    return;
  }
  const upload = await resumable(item);
  if (upload) {
    item.adopt(upload.id);
    item.offset = upload.offset;
    item.resumedFrom = upload.offset;
    unfinished = unfinished.filter((entry) => entry.id !== upload.id);
    view.renderUnfinished(unfinished);
  }
  queue.enqueue(item);
}

function addFiles(files) {
  for (const file of files) addFile(file);
}

const input = root.querySelector("#file-input");
input.addEventListener("change", () => {
  addFiles(input.files);
  input.value = ""; // choosing the same file again must fire "change" again
});
root.querySelector("#choose-files").addEventListener("click", () => input.click());

const dropZone = root.querySelector("#drop-zone");
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  addFiles(event.dataTransfer.files);
});

addEventListener("beforeunload", (event) => {
  if (queue.busy) {
    // Leaving would stop the running uploads (they stay resumable, but the user must choose the files again).
    event.preventDefault();
    event.returnValue = "";
  }
});

// How long after the page loaded an event may still be the previous page's last commit.
const SETTLE_MS = 3000;

/** An upload this tab is not running moved (another tab, a script): keep the unfinished list current. */
async function followElsewhere(event) {
  const mine = () => queue.items.some((item) => item.uploadId === event.id);
  if (mine()) return;
  await unfinishedLoaded;
  const entry = unfinished.find((upload) => upload.id === event.id);
  if (event.status !== "uploading") {
    unfinished = unfinished.filter((upload) => upload.id !== event.id);
  } else if (entry) {
    // Just after a reload, the previous page's connection makes its last bytes durable: that
    // is this user's own upload letting go, not another program writing.
    const settling = performance.now() < SETTLE_MS && !entry.movedAt;
    Object.assign(entry, { offset: event.offset }, settling ? {} : { movedAt: Date.now() });
  } else {
    // A new one (started elsewhere after this page loaded): its name comes from the API.
    let upload;
    try {
      upload = await api.get(event.id);
    } catch {
      return;
    }
    if (mine() || unfinished.some((known) => known.id === upload.id) || upload.status !== "uploading") return;
    unfinished.push({ ...upload, offset: Math.max(upload.offset, event.offset), movedAt: Date.now() });
  }
  view.renderUnfinished(unfinished);
}

// "Uploading elsewhere" lasts while events keep coming (the writer publishes about once a second).
setInterval(() => {
  if (unfinished.some((upload) => upload.movedAt)) view.renderUnfinished(unfinished);
}, 2000);

async function loadUnfinished() {
  try {
    unfinished = await api.unfinished();
  } catch {
    unfinished = []; // the list is a convenience; uploads still work without it
  }
  view.renderUnfinished(unfinished);
  root.dataset.ready = "true";
}

view.renderTotal(queue.totals());
followProgress(followElsewhere, (live) => {
  root.dataset.live = String(live);
});
