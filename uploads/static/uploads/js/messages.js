// Human sentences for every refusal code the page can meet (the API, tus) and for the client's own states.

import { formatBytes } from "./progress.js";

function numbersIn(detail) {
  return (detail.match(/\d+/g) ?? []).map(Number);
}

/**
 * The sentence to show for `message` ({code, detail, retryAfter}) about `item`.
 * `limits.maxFileSize` is the server's largest file (rendered into the page).
 */
export function describe(message, item, limits) {
  const { code, detail = "" } = message;
  const wait = message.retryAfter ?? message.retry_after;
  const inSeconds = wait ? ` in ${wait} s` : "";
  switch (code) {
    case "file_too_large":
      return (
        `${item.name} is ${formatBytes(item.size)}; ` +
        `the largest file this server accepts is ${formatBytes(limits.maxFileSize)}.`
      );
    case "quota_exceeded": {
      // The server's detail: "The upload needs N bytes but only F of your Q-byte quota are free."
      const [needs, free, quota] = numbersIn(detail);
      if (quota !== undefined) {
        return (
          `Not enough space: ${item.name} needs ${formatBytes(needs)}, but only ${formatBytes(free)} ` +
          `of your ${formatBytes(quota)} quota is free. Delete some files to make room.`
        );
      }
      return `Not enough space in your quota for ${item.name}. ${detail}`;
    }
    case "user_slots_exhausted":
    case "slots_exhausted":
      return `All your upload slots are in use; starting${inSeconds || " as soon as one is free"}.`;
    case "global_slots_exhausted":
      return `The server is handling as many uploads as it can; trying again${inSeconds}.`;
    case "checksum_mismatch":
      return "The bytes the server received do not match this file (checksum mismatch); the upload failed. Upload it again.";
    case "not_found":
      return "This upload no longer exists on the server (it expired or was deleted). Choose the file again to start over.";
    case "expired":
      return "This upload expired after being idle too long; its bytes were removed. Choose the file again to start over.";
    case "cancelled":
      return (
        "This upload was cancelled elsewhere (another tab, My files or a script); its bytes were removed. " +
        "Choose the file again to start over."
      );
    case "not_uploading":
      return "This upload no longer accepts bytes: it was completed, cancelled or expired elsewhere.";
    case "unauthenticated":
    case "http_401":
    case "http_403":
    case "permission_denied":
      return "Your session has ended: sign in again (in another tab), then press Resume.";
    case "unavailable":
      return `The server cannot reach its database right now; retrying${inSeconds}.`;
    case "internal_error":
      return `The server had a problem; retrying${inSeconds}.`;
    case "idle_timeout":
      return "The connection was idle for too long; reconnecting.";
    case "lease_lost":
      return "The server reclaimed this upload's slot; reconnecting.";
    case "busy":
      return (
        "An earlier connection still holds this upload and has not let go yet (another tab, a script, " +
        `or one a restarted server lost, which it lets go of within a minute); retrying${inSeconds}.`
      );
    case "offset_mismatch":
      return "The server stands at another point of this file than the page thought; continuing from the server's.";
    case "network":
      return "Connection lost; reconnecting.";
    case "offline":
      return "You are offline; the upload continues when the network is back.";
    case "gave_up":
      return "The server could not be reached after several attempts. Press Resume to try again.";
    case "duplicate":
      return `${item.name} is already in the list above.`;
    case "file_unreadable":
      return "The file could not be read any more (was it moved or changed?). Choose it again.";
    case "protocol_error":
    case "size_exceeded":
      return `The server refused the data (${code}); press Resume to continue from where it stands.`;
    case "unsupported_media_type":
    case "tus_version_unsupported":
      return `The server refused this page's upload request (${code}); reload the page and choose the file again.`;
    case "request_too_large":
    case "invalid":
      return `The server refused this upload: ${detail}`;
    default:
      return detail || `The server refused this upload (${code}).`;
  }
}
