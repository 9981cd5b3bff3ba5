// Telling a file again after a reload: a client fingerprint, and {fingerprint -> upload id} in localStorage.
//
// A browser cannot reopen a file after a reload, so the user chooses it again; the fingerprint (name,
// size, type, lastModified and the sha256 of the first MiB) is stored with the upload on the server, and
// an upload is only ever resumed with a file whose fingerprint matches: same name and size is no proof.

const STORE_KEY = "directdrivex.uploads";
const HEAD_BYTES = 1024 * 1024;
// The API's limit for the opaque fingerprint field.
const MAX_FINGERPRINT_CHARS = 256;

async function sha256Hex(data) {
  const digest = await crypto.subtle.digest("SHA-256", data);
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** The file's fingerprint: a short string; reads only the first MiB (File.slice), never the whole file. */
export async function fingerprintOf(file) {
  const identity = [file.name, file.size, file.type, file.lastModified].join("\u0000");
  if (!globalThis.crypto?.subtle) {
    // Plain http on a non-local host is not a secure context: no crypto.subtle, so no content hash.
    return `v0:${file.size}:${file.lastModified}:${encodeURIComponent(file.name)}`.slice(0, MAX_FINGERPRINT_CHARS);
  }
  const head = await sha256Hex(await file.slice(0, HEAD_BYTES).arrayBuffer());
  return `v1:${await sha256Hex(new TextEncoder().encode(`${identity}\u0000${head}`))}`;
}

function readAll() {
  try {
    return JSON.parse(localStorage.getItem(STORE_KEY) || "{}");
  } catch {
    return {}; // a corrupt entry is worth less than a working page
  }
}

function writeAll(entries) {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(entries));
  } catch {
    // Storage full or disabled: resume still works through the server's list of unfinished uploads.
  }
}

export const resumeStore = {
  get(fingerprint) {
    return readAll()[fingerprint] ?? null;
  },
  set(fingerprint, uploadId) {
    writeAll({ ...readAll(), [fingerprint]: uploadId });
  },
  drop(fingerprint) {
    const entries = readAll();
    delete entries[fingerprint];
    writeAll(entries);
  },
};
