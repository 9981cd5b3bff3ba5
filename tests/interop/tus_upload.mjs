// One file uploaded with tus-js-client in Node, for tests/test_tus_interop.py.
//
//   node tus_upload.mjs --endpoint http://HOST:PORT/api/tus/ --token KEY [--chunk-size N]
//                       [--retry-delays 0,500,1000] [--sha256 HEX] FILE
//
// Without --chunk-size the whole file goes in one PATCH (tus-js-client's default, chunkSize Infinity).
// --retry-delays "" turns retries off. Every line on stdout is one JSON object:
//   {"event": "url", "url"}                             the upload's URL is known (after its POST or a HEAD)
//   {"event": "request", "method", "status", "offset"}  a request answered; offset: for a PATCH the
//                                                       Upload-Offset it was sent with, for a HEAD the one answered
//   {"event": "retry", "attempt", "status", "message"}  an attempt failed and will be retried (status 0: no answer)
//   {"event": "success" | "error", "url", "size", "head_offsets", "patch_offsets", "attempts", "retries",
//    "message"?}                                         how it ended: the offsets HEADs answered, the offsets
//                                                       every PATCH was sent from (answered or not), 1 + retries
// The exit code is 0 for success, 1 for an error.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import * as tus from 'tus-js-client';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    endpoint: { type: 'string' },
    token: { type: 'string' },
    'chunk-size': { type: 'string' },
    'retry-delays': { type: 'string', default: '0,500,1000,2000,3000' },
    sha256: { type: 'string' },
  },
});

if (!values.endpoint || !values.token || positionals.length !== 1) {
  process.stderr.write('usage: node tus_upload.mjs --endpoint URL --token KEY [options] FILE\n');
  process.exit(2);
}

const file = positionals[0];
const size = fs.statSync(file).size;
const headOffsets = [];
const patchOffsets = [];
const retries = [];

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

function parseDelays(text) {
  if (text.trim() === '') return null;
  return text.split(',').map((delay) => Number(delay.trim()));
}

// tus-js-client's own rule (a network error, a 5xx, 409 or 423 is retried; other 4xx are not),
// restated so that every retry is counted and reported.
function retryable(error) {
  const status = error.originalResponse ? error.originalResponse.getStatus() : 0;
  return !(status >= 400 && status < 500) || status === 409 || status === 423;
}

function summary(event, extra = {}) {
  return {
    event,
    url: upload.url,
    size,
    head_offsets: headOffsets,
    patch_offsets: patchOffsets,
    attempts: retries.length + 1,
    retries,
    ...extra,
  };
}

const metadata = { filename: path.basename(file), filetype: 'application/octet-stream' };
if (values.sha256) metadata.sha256 = values.sha256;
const options = {
  endpoint: values.endpoint,
  headers: { Authorization: `Token ${values.token}` },
  uploadSize: size,
  metadata,
  retryDelays: parseDelays(values['retry-delays']),
  onUploadUrlAvailable() {
    emit({ event: 'url', url: upload.url });
  },
  onBeforeRequest(req) {
    // Every PATCH sent, answered or not: the offsets the client started from.
    if (req.getMethod() === 'PATCH') patchOffsets.push(Number(req.getHeader('Upload-Offset')));
  },
  onAfterResponse(req, res) {
    const method = req.getMethod();
    const header = method === 'PATCH' ? req.getHeader('Upload-Offset') : res.getHeader('Upload-Offset');
    const offset = header == null ? null : Number(header);
    if (method === 'HEAD' && offset !== null && res.getStatus() < 300) headOffsets.push(offset);
    emit({ event: 'request', method, status: res.getStatus(), offset });
  },
  onShouldRetry(error, attempt) {
    const retry = retryable(error);
    if (retry) {
      const status = error.originalResponse ? error.originalResponse.getStatus() : 0;
      const record = { attempt, status, message: String(error.message).split('\n')[0] };
      retries.push(record);
      emit({ event: 'retry', ...record });
    }
    return retry;
  },
  onError(error) {
    emit(summary('error', { message: String(error) }));
    process.exit(1);
  },
  onSuccess() {
    emit(summary('success'));
  },
};
if (values['chunk-size']) options.chunkSize = Number(values['chunk-size']);

// A ReadStream with a path: tus-js-client reads slices from the file itself, so it can resume
// from any offset the server names, with any chunk size (Infinity included).
const upload = new tus.Upload(fs.createReadStream(file), options);
upload.start();
