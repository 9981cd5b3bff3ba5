// The HTTP API calls and tus 1.0 over XMLHttpRequest (docs/tus.md) for one file, with the retry policy.
//
// One Transfer sends one file: POST /api/uploads/ makes the upload (or the page continues one), then
// each attempt is HEAD /api/tus/<id> for the server's durable offset and one PATCH whose body is
// `file.slice(offset)`: a Blob, so the browser reads the file from disk itself and no byte passes
// through JavaScript. XMLHttpRequest, not fetch: only XHR reports upload progress. The PATCH's 204
// carries the new durable offset; the one that brings the last byte is answered once the server has
// verified and stored the file. Retries follow tus-js-client: delays 0, 1, 3, 5 s, the attempt counter
// reset whenever the offset advanced, so the delays apply per stall, not per upload; every retry asks
// the server where it stands (HEAD) first, never trusting the page's own count.

export const RETRY_DELAYS_MS = [0, 1000, 3000, 5000];
const TUS_VERSION = "1.0.0";
// Refusals after which the upload can never continue, whatever the client does.
const GONE = new Set(["not_found", "expired", "cancelled", "not_uploading", "checksum_mismatch"]);
// The code a bodiless answer (HEAD, or a proxy's error page) stands for, by status.
const STATUS_CODES = {
  401: "unauthenticated",
  403: "permission_denied",
  404: "not_found",
  408: "idle_timeout",
  409: "offset_mismatch",
  410: "not_uploading",
  412: "tus_version_unsupported",
  413: "size_exceeded",
  415: "unsupported_media_type",
  423: "busy",
  429: "slots_exhausted",
  460: "checksum_mismatch",
  500: "internal_error",
  503: "unavailable",
};

/** A refusal from the server (or the network): {code, detail, retryAfter}; `retryable` says what to do. */
export class Refusal extends Error {
  constructor({ code, detail = "", retryAfter = null, retryable = false, status = null }) {
    super(detail || code);
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
    this.retryable = retryable;
    this.status = status;
  }

  /** The refusal an HTTP answer stands for: its JSON body's code if it has one, else its status's. */
  static fromAnswer(status, data, retryAfterHeader) {
    const header = Number.parseInt(retryAfterHeader ?? "", 10);
    const code = data?.code ?? STATUS_CODES[status] ?? `http_${status}`;
    return new Refusal({
      code,
      detail: data?.detail ?? "",
      retryAfter: Number.isFinite(header) ? header : (data?.retry_after ?? null),
      // No retry on a 4xx except the ones that mean "not now" (the anchors' rule): a timeout, an
      // offset the server sees differently (409: ask it again), busy (423), no slot (429).
      retryable: !GONE.has(code) && (status >= 500 || [408, 409, 423, 429].includes(status)),
      status,
    });
  }

  /**
   * Waits, not failures: they do not use up retry attempts. No slot is free; or the upload is busy,
   * held by an earlier request that has not let go yet (after a server crash, until its lease runs
   * out: up to a minute).
   */
  get waitsForSlot() {
    return ["user_slots_exhausted", "global_slots_exhausted", "slots_exhausted", "busy"].includes(this.code);
  }
}

// --- the HTTP API and the tus endpoint ----------------------------------------------------------

export class Api {
  constructor({ listUrl, tusUrl, csrfToken }) {
    this.listUrl = listUrl;
    this.tusUrl = tusUrl;
    this.csrfToken = csrfToken;
  }

  async call(method, url, { body, headers = {}, signal } = {}) {
    let response;
    try {
      response = await fetch(url, {
        method,
        credentials: "same-origin",
        headers: {
          Accept: "application/json",
          "X-CSRFToken": this.csrfToken,
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
          ...headers,
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        signal,
      });
    } catch {
      throw new Refusal({ code: "network", retryable: true });
    }
    if (response.ok) return response;
    const data = method === "HEAD" ? null : await response.json().catch(() => null);
    throw Refusal.fromAnswer(response.status, data, response.headers.get("Retry-After"));
  }

  async json(method, url, body) {
    const response = await this.call(method, url, { body });
    return response.status === 204 ? null : response.json();
  }

  create(file, fingerprint) {
    return this.json("POST", this.listUrl, { filename: file.name, size: file.size, fingerprint });
  }

  get(uploadId) {
    return this.json("GET", `${this.listUrl}${encodeURIComponent(uploadId)}/`);
  }

  remove(uploadId) {
    return this.json("DELETE", `${this.listUrl}${encodeURIComponent(uploadId)}/`);
  }

  unfinished() {
    return this.json("GET", `${this.listUrl}?status=uploading&limit=1000`);
  }

  uploadUrl(uploadId) {
    return `${this.tusUrl}${encodeURIComponent(uploadId)}`;
  }

  /**
   * tus HEAD: the upload's durable offset. An earlier request that still writes the upload (this
   * page's previous PATCH, another tab) is told to stop first, so the answer cannot move any more.
   */
  async offset(uploadId, signal) {
    const response = await this.call("HEAD", this.uploadUrl(uploadId), {
      headers: { "Tus-Resumable": TUS_VERSION },
      signal,
    });
    const offset = Number.parseInt(response.headers.get("Upload-Offset") ?? "", 10);
    if (!Number.isFinite(offset)) {
      throw new Refusal({ code: "internal_error", detail: "HEAD without Upload-Offset", retryable: true });
    }
    return offset;
  }

  /**
   * tus PATCH of `file` from `offset` to its end, as one request whose body is the file itself.
   * `onProgress(bytes)` hears how many body bytes have gone out; resolves with the server's new
   * durable offset (the 204's Upload-Offset), or null once `signal` aborts it; rejects with a Refusal.
   */
  patch(uploadId, file, offset, { onProgress, signal }) {
    return new Promise((resolve, reject) => {
      if (signal.aborted) {
        resolve(null);
        return;
      }
      const xhr = new XMLHttpRequest();
      xhr.open("PATCH", this.uploadUrl(uploadId));
      xhr.setRequestHeader("Tus-Resumable", TUS_VERSION);
      xhr.setRequestHeader("Upload-Offset", String(offset));
      xhr.setRequestHeader("Content-Type", "application/offset+octet-stream");
      xhr.setRequestHeader("X-CSRFToken", this.csrfToken);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = (event) => onProgress(event.loaded);
      xhr.onload = () => {
        if (xhr.status === 204) {
          const durable = Number.parseInt(xhr.getResponseHeader("Upload-Offset") ?? "", 10);
          if (Number.isFinite(durable)) resolve(durable);
          else reject(new Refusal({ code: "internal_error", detail: "204 without Upload-Offset", retryable: true }));
          return;
        }
        let data = null;
        try {
          data = JSON.parse(xhr.responseText);
        } catch {
          // not JSON: a proxy's error page; the status says enough
        }
        reject(Refusal.fromAnswer(xhr.status, data, xhr.getResponseHeader("Retry-After")));
      };
      xhr.onerror = () => reject(new Refusal({ code: "network", retryable: true }));
      xhr.onabort = () => resolve(null);
      xhr.onloadend = () => signal.removeEventListener("abort", stop);
      const stop = () => xhr.abort();
      signal.addEventListener("abort", stop);
      xhr.send(file.slice(offset)); // a Blob: the browser streams it from disk
    });
  }
}

// --- one file's transfer -------------------------------------------------------------------------

/** The refusal an upload's status stands for once the server says it takes no more bytes (410). */
function refusalForStatus(upload) {
  if (upload.status === "failed") return new Refusal({ code: "checksum_mismatch" });
  if (upload.status === "expired" || upload.status === "cancelled") return new Refusal({ code: upload.status });
  return new Refusal({ code: "not_uploading" });
}

/** Whether `file` can still be read (a changed or deleted file fails the PATCH like a network error would). */
async function readable(file) {
  try {
    await file.slice(0, 1).arrayBuffer();
    return true;
  } catch {
    return false;
  }
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
    this.controller = new AbortController(); // aborts the running HEAD or PATCH
    this.wake = null;
    this.posted = false; // whether a POST went out (its answer may have been lost)
  }

  /** Stop sending: abort the request and end run(); the bytes that reached the server stay there. */
  stop(reason) {
    this.stopReason = reason;
    this.controller.abort();
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
    let offsetAtLastFailure = item.serverOffset ?? 0;
    while (!this.stopReason) {
      try {
        const done = await this.attempt();
        if (done) {
          item.set({ status: "complete", offset: item.size, sha256: done.sha256, message: null });
          return;
        }
      } catch (error) {
        if (this.stopReason) break;
        const refusal = await this.explain(error);
        if (!refusal.retryable) {
          item.set({ status: "failed", message: refusal });
          return;
        }
        if (refusal.waitsForSlot) {
          const seconds = refusal.retryAfter ?? 5;
          item.set({ status: "waiting", message: refusal });
          await this.sleep(seconds * 1000);
          continue;
        }
        // Durable progress since the last stall (the last HEAD or 204 says): a fresh budget.
        if ((item.serverOffset ?? 0) > offsetAtLastFailure) attempt = 0;
        offsetAtLastFailure = item.serverOffset ?? 0;
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

  /**
   * One attempt: where the server stands, then one PATCH of the rest of the file. Resolves {sha256}
   * once the upload is complete, null when stopped; rejects with a Refusal.
   */
  async attempt() {
    const item = this.item;
    item.set({ status: "connecting" });
    const made = !item.uploadId && (await this.create());
    let offset = 0; // a new upload's
    if (!made) {
      offset = await this.api.offset(item.uploadId, this.controller.signal);
      if (item.resumedFrom !== null && item.serverOffset === null) item.resumedFrom = offset;
    }
    if (this.stopReason) return null;
    item.connected(offset);
    if (offset < item.size) {
      const base = offset;
      offset = await this.api.patch(item.uploadId, item.file, base, {
        signal: this.controller.signal,
        onProgress: (sent) => {
          if (!this.stopReason) item.progress(base + sent);
        },
      });
      if (offset === null) return null; // stopped
      item.durableAt(offset);
    }
    if (offset < item.size) {
      // The server kept less than the body (it was cut short): the next attempt asks where it stands.
      throw new Refusal({ code: "network", detail: `the server has ${offset} bytes`, retryable: true });
    }
    // Complete: the final PATCH was answered after the server verified and stored the file.
    const upload = await this.api.get(item.uploadId);
    if (upload.status !== "complete") throw refusalForStatus(upload);
    return { sha256: upload.sha256 };
  }

  /** `error` as a Refusal, with the upload's status behind a 410 and a file that became unreadable. */
  async explain(error) {
    if (!(error instanceof Refusal)) {
      return new Refusal({ code: "internal_error", detail: String(error), retryable: true });
    }
    if (error.code === "network" && !(await readable(this.item.file))) {
      return new Refusal({ code: "file_unreadable" });
    }
    if (error.code === "not_uploading" && this.item.uploadId) {
      // tus says only "gone": the API says whether it was cancelled, expired or failed its checksum.
      try {
        return refusalForStatus(await this.api.get(this.item.uploadId));
      } catch {
        return error;
      }
    }
    return error;
  }

  /** Make the server's upload for this file: true when made now (offset 0), false when adopted. */
  async create() {
    const item = this.item;
    if (this.posted) {
      // The answer to an earlier POST may have been lost: adopt that upload instead of making a second one.
      const mine = (await this.api.unfinished()).find((upload) => upload.fingerprint === item.fingerprint);
      if (mine) {
        item.adopt(mine.id);
        return false;
      }
    }
    this.posted = true;
    const upload = await this.api.create(item.file, item.fingerprint);
    item.adopt(upload.id);
    return true;
  }
}
