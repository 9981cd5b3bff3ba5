// The HTTP API calls and the WebSocket upload protocol (docs/protocol.md) for one file, with the retry policy.
//
// One Transfer streams one file: POST (or GET, to resume) for a ws_url, then binary frames read with
// File.slice one chunk at a time, never more than `window` bytes beyond the last ack, always from the
// server's ready.offset. Retries follow tus-js-client: delays 0, 1, 3, 5 s, the attempt counter reset
// whenever the offset advanced, so the delays apply per stall, not per upload.

export const RETRY_DELAYS_MS = [0, 1000, 3000, 5000];
// Close codes that leave the upload resumable: network drops (1001, 1006, 1011-1013) and the server's
// retryable refusals. 4401 too: every reconnect fetches a fresh ws_url (its ticket) first.
const RETRYABLE_CLOSES = new Set([1001, 1006, 1011, 1012, 1013, 4401, 4408, 4410, 4429, 4500, 4503]);

/** A refusal from the server (HTTP or WebSocket): {code, detail, retryAfter}; `retryable` says what to do. */
export class Refusal extends Error {
  constructor({ code, detail = "", retryAfter = null, retryable = false, status = null }) {
    super(detail || code);
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
    this.retryable = retryable;
    this.status = status;
  }

  /**
   * Waits, not failures: they do not use up retry attempts. No slot is free; or the upload is busy,
   * held by a previous connection until it lets go or its lease runs out (after a server restart,
   * up to a lease: the server's one answer to "is that connection alive?").
   */
  get waitsForSlot() {
    return ["user_slots_exhausted", "global_slots_exhausted", "slots_exhausted", "busy"].includes(this.code);
  }
}

// --- the HTTP API ------------------------------------------------------------------------------

export class Api {
  constructor({ listUrl, csrfToken }) {
    this.listUrl = listUrl;
    this.csrfToken = csrfToken;
  }

  async call(method, url, body) {
    let response;
    try {
      response = await fetch(url, {
        method,
        credentials: "same-origin",
        headers: {
          Accept: "application/json",
          "X-CSRFToken": this.csrfToken,
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch {
      throw new Refusal({ code: "network", retryable: true });
    }
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (response.ok) return data;
    const header = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
    throw new Refusal({
      code: data?.code ?? `http_${response.status}`,
      detail: data?.detail ?? "",
      retryAfter: Number.isFinite(header) ? header : (data?.retry_after ?? null),
      // No retry on a 4xx except the ones that mean "not now" (the anchors' rule).
      retryable: response.status >= 500 || [408, 409, 423, 429].includes(response.status),
      status: response.status,
    });
  }

  create(file, fingerprint) {
    return this.call("POST", this.listUrl, { filename: file.name, size: file.size, fingerprint });
  }

  get(uploadId) {
    return this.call("GET", `${this.listUrl}${encodeURIComponent(uploadId)}/`);
  }

  remove(uploadId) {
    return this.call("DELETE", `${this.listUrl}${encodeURIComponent(uploadId)}/`);
  }

  unfinished() {
    return this.call("GET", `${this.listUrl}?status=uploading&limit=1000`);
  }
}

// --- one file's transfer -------------------------------------------------------------------------

function websocketUrl(path) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;
}

/** What a non-`uploading` status on the resume check means for this transfer. */
function refusalForStatus(upload) {
  if (upload.status === "failed") return new Refusal({ code: "checksum_mismatch" });
  return new Refusal({ code: upload.status === "expired" ? "expired" : "not_uploading" });
}

export class Transfer {
  /**
   * @param item  the queue item: file, uploadId, fingerprint, offset, and set(patch) to report state
   * @param api   an Api
   */
  constructor(item, api) {
    this.item = item;
    this.api = api;
    this.stopReason = null; // "paused" | "cancelled"
    this.socket = null;
    this.wake = null;
  }

  /** Stop sending, close the connection and end run(); the bytes the server made durable stay. */
  stop(reason) {
    this.stopReason = reason;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000, reason);
    this.wake?.();
  }

  sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    }).finally(() => {
      this.wake = null;
    });
  }

  async untilOnline() {
    // The anchors pause the queue while the browser knows it is offline and go on at the `online` event.
    while (!navigator.onLine && !this.stopReason) {
      this.item.set({ status: "retrying", message: { code: "offline" } });
      await new Promise((resolve) => {
        this.wake = resolve;
        addEventListener("online", resolve, { once: true });
      });
      this.wake = null;
    }
  }

  /** Upload until complete, stopped, or refused for good; reports everything through item.set(). */
  async run() {
    const item = this.item;
    let attempt = 0;
    let offsetAtLastFailure = item.offset;
    let upload = null; // the server's representation, with a fresh ws_url
    while (!this.stopReason) {
      try {
        item.set({ status: "connecting" });
        if (!item.uploadId) {
          upload = await this.create(attempt > 0);
        } else if (!upload) {
          upload = await this.api.get(item.uploadId);
        }
        if (upload.status === "complete") {
          item.set({ status: "complete", offset: item.size, sha256: upload.sha256, message: null });
          return;
        }
        if (upload.status !== "uploading") throw refusalForStatus(upload);
        const done = await this.stream(upload.ws_url);
        if (done) {
          item.set({ status: "complete", offset: item.size, sha256: done.sha256, message: null });
          return;
        }
      } catch (error) {
        if (this.stopReason) break;
        const refusal = error instanceof Refusal ? error : new Refusal({ code: "internal_error", retryable: true });
        if (!refusal.retryable) {
          item.set({ status: "failed", message: refusal });
          return;
        }
        upload = null; // reconnect with a fresh ws_url and the server's status
        if (refusal.waitsForSlot) {
          const seconds = refusal.retryAfter ?? 5;
          item.set({ status: "waiting", message: refusal });
          await this.sleep(seconds * 1000);
          continue;
        }
        if (item.offset > offsetAtLastFailure) attempt = 0; // progress since the last stall: a fresh budget
        offsetAtLastFailure = item.offset;
        if (attempt >= RETRY_DELAYS_MS.length) {
          item.set({ status: "failed", message: new Refusal({ code: "gave_up", detail: refusal.code }) });
          return;
        }
        const delay = Math.max(RETRY_DELAYS_MS[attempt], (refusal.retryAfter ?? 0) * 1000);
        attempt += 1;
        item.set({ status: "retrying", message: refusal, retryInSeconds: delay / 1000, attempt });
        await this.sleep(delay);
        await this.untilOnline();
      }
    }
    item.set({ status: this.stopReason });
  }

  async create(retrying) {
    const item = this.item;
    if (retrying) {
      // The answer to an earlier POST may have been lost: adopt that upload instead of making a second one.
      const mine = (await this.api.unfinished()).find((upload) => upload.fingerprint === item.fingerprint);
      if (mine) {
        item.adopt(mine.id);
        return mine;
      }
    }
    const upload = await this.api.create(item.file, item.fingerprint);
    item.adopt(upload.id);
    return upload;
  }

  /** One connection: resolves {sha256} on completion, null when stopped; rejects with a Refusal. */
  stream(path) {
    const item = this.item;
    const file = item.file;
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(websocketUrl(path));
      socket.binaryType = "arraybuffer";
      this.socket = socket;
      let ready = null;
      let sent = 0;
      let acked = 0;
      let pumping = false;
      let error = null;
      let complete = null;
      let readFailure = null;

      const pump = async () => {
        if (pumping) return;
        pumping = true;
        try {
          while (socket.readyState === WebSocket.OPEN && !this.stopReason && sent < file.size) {
            const length = Math.min(ready.chunk_size, file.size - sent);
            if (sent + length - acked > ready.window) break; // the credit window is full: wait for an ack
            const start = sent;
            sent += length;
            // One chunk in memory at a time (plus what the socket buffers, bounded by the window).
            const bytes = await file.slice(start, start + length).arrayBuffer();
            if (socket.readyState !== WebSocket.OPEN) break;
            socket.send(bytes);
          }
        } catch (failure) {
          readFailure = failure; // the file changed or vanished on disk
          socket.close(1000, "file unreadable");
        } finally {
          pumping = false;
        }
      };

      socket.addEventListener("message", (event) => {
        if (typeof event.data !== "string") return;
        const message = JSON.parse(event.data);
        if (message.type === "ready") {
          ready = message;
          sent = acked = message.offset; // the server's durable resume point, never our own count
          item.connected(message.offset);
          pump();
        } else if (message.type === "ack") {
          acked = message.offset;
          item.progress(acked);
          pump();
        } else if (message.type === "complete") {
          complete = message;
        } else if (message.type === "error") {
          error = message;
        }
      });

      socket.addEventListener("close", (event) => {
        this.socket = null;
        if (complete) resolve({ sha256: complete.sha256 });
        else if (this.stopReason) resolve(null);
        else if (readFailure) reject(new Refusal({ code: "file_unreadable", detail: String(readFailure) }));
        else {
          const code = error?.code ?? "network";
          const retryable = RETRYABLE_CLOSES.has(event.code) || (event.code === 4409 && code === "busy");
          reject(new Refusal({ code, detail: error?.detail ?? "", retryAfter: error?.retry_after ?? null, retryable }));
        }
      });
    });
  }
}
