// The upload queue: every chosen file as an item, at most `limit` transferring at once, pause/resume/cancel.
//
// `limit` is the server's per-user slot count, rendered into the page: starting more would only earn
// 429s. Items report every change as a "change" event; the view listens, the queue never touches the DOM.

import { Meter } from "./progress.js";
import { resumeStore } from "./resume.js";
import { Transfer } from "./transport.js";

// Statuses in which an item holds (or waits for) one of the queue's places.
const RUNNING = new Set(["connecting", "uploading", "finishing", "retrying", "waiting"]);
const FINISHED = new Set(["complete", "failed", "cancelled"]);
// Refusals after which the upload itself is finished for good, whatever the client does.
const GONE = new Set(["not_found", "expired", "cancelled", "not_uploading", "checksum_mismatch"]);

let nextKey = 1;

export class Item extends EventTarget {
  constructor(file) {
    super();
    this.key = nextKey++;
    this.file = file;
    this.name = file.name;
    this.size = file.size;
    this.fingerprint = null;
    this.uploadId = null;
    // Bytes the server has or is receiving: its durable offset plus what the running PATCH has sent.
    this.offset = 0;
    this.serverOffset = null; // the server's durable offset, as its last answer (HEAD, PATCH) said
    this.status = "checking"; // fingerprinting and the resume check run first
    this.message = null; // a Refusal (or {code}) the view turns into words
    this.sha256 = null;
    this.resumedFrom = null; // the server's offset when this item continued an unfinished upload
    this.meter = new Meter();
    this.transfer = null;
  }

  get running() {
    return RUNNING.has(this.status);
  }

  get finished() {
    return FINISHED.has(this.status);
  }

  set(patch) {
    Object.assign(this, patch);
    if (this.fingerprint && this.uploadGone) resumeStore.drop(this.fingerprint);
    this.dispatchEvent(new Event("change"));
  }

  /** Whether the server's upload can never continue (so its resume entry is worth nothing). */
  get uploadGone() {
    if (this.status === "complete" || this.status === "cancelled") return true;
    return this.status === "failed" && GONE.has(this.message?.code);
  }

  /** The server made an upload for this file (or this file continues one): remember it across reloads. */
  adopt(uploadId) {
    this.uploadId = uploadId;
    if (this.fingerprint) resumeStore.set(this.fingerprint, uploadId);
  }

  /** The server said where the upload stands (HEAD), and the bytes from there on start going out. */
  connected(offset) {
    this.meter.reset();
    this.meter.update(offset, this.size);
    this.set({ status: "uploading", offset, serverOffset: offset, message: null });
  }

  /** The running PATCH has sent the file up to `offset`; once all is out, the server finishes. */
  progress(offset) {
    this.meter.update(offset, this.size);
    this.set({ offset, status: offset >= this.size ? "finishing" : "uploading" });
  }

  /** The server answered a PATCH: `offset` bytes are durable. */
  durableAt(offset) {
    this.set({ offset, serverOffset: offset });
  }
}

export class UploadQueue extends EventTarget {
  constructor({ api, limit }) {
    super();
    this.api = api;
    this.limit = Math.max(1, limit);
    this.items = [];
  }

  add(file) {
    const item = new Item(file);
    item.addEventListener("change", () => this.dispatchEvent(new Event("change")));
    this.items.push(item);
    this.dispatchEvent(new CustomEvent("added", { detail: item }));
    return item;
  }

  /** The item is ready to go (fingerprinted, resume decided): give it a place when one is free. */
  enqueue(item) {
    item.set({ status: "queued" });
    this.schedule();
  }

  schedule() {
    let running = this.items.filter((item) => item.transfer).length;
    for (const item of this.items) {
      if (running >= this.limit) break;
      if (item.status !== "queued" || item.transfer) continue;
      running += 1;
      const transfer = new Transfer(item, this.api);
      item.transfer = transfer;
      transfer.run().finally(() => {
        item.transfer = null;
        this.schedule();
      });
    }
  }

  pause(item) {
    if (item.transfer) item.transfer.stop("paused");
    else if (item.status === "queued") item.set({ status: "paused" });
  }

  resume(item) {
    if (item.status === "paused" || item.status === "failed") this.enqueue(item);
  }

  /** Cancel: stop the transfer and DELETE the upload, which frees its slot and its partial bytes. */
  async cancel(item) {
    item.transfer?.stop("cancelled");
    if (item.fingerprint) resumeStore.drop(item.fingerprint);
    item.set({ status: "cancelled" });
    if (item.uploadId) {
      try {
        await this.api.remove(item.uploadId);
      } catch (refusal) {
        if (refusal.status !== 404) item.set({ message: refusal });
      }
    }
  }

  /** Whether leaving the page would interrupt something. */
  get busy() {
    return this.items.some((item) => item.running || item.status === "queued" || item.status === "checking");
  }

  totals() {
    const counted = this.items.filter((item) => item.status !== "cancelled");
    return {
      count: counted.length,
      size: counted.reduce((sum, item) => sum + item.size, 0),
      done: counted.reduce((sum, item) => sum + (item.status === "complete" ? item.size : item.offset), 0),
      complete: counted.filter((item) => item.status === "complete").length,
    };
  }
}
