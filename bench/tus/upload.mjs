// The tus-js-client uploader of bench/upload.py: one file to a tus endpoint, in PATCHes of
// --chunk-size bytes (default 4 MiB), or in one PATCH with --chunk-size default (tus-js-client's own
// default, chunkSize Infinity: the whole file streamed from disk as one request body).
//
//   node upload.mjs --endpoint http://127.0.0.1:P/files/ [--chunk-size N|default]
//                   [--header 'Name: value']... [--metadata key=value]... FILE
//
// --header adds a request header to every request (e.g. 'Authorization: Token <key>' for
// DirectDriveX's /api/tus/); --metadata adds Upload-Metadata pairs besides filename (e.g.
// sha256=<hex>, which DirectDriveX verifies). Prints one JSON line: {"url", "size", "seconds",
// "chunkSize"}; exits 1 on a failed upload.
import fs from 'node:fs';
import { parseArgs } from 'node:util';

import * as tus from 'tus-js-client';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    endpoint: { type: 'string' },
    'chunk-size': { type: 'string', default: String(4 * 1024 * 1024) },
    header: { type: 'string', multiple: true, default: [] },
    metadata: { type: 'string', multiple: true, default: [] },
  },
});

function fail(message) {
  process.stderr.write(`${message}\n`);
  process.exit(1);
}

// "default", "infinity" or 0: leave chunkSize to tus-js-client (Infinity, one PATCH per attempt).
const chunkText = values['chunk-size'].toLowerCase();
const chunkSize = ['default', 'infinity', '0'].includes(chunkText) ? undefined : Number(chunkText);
if (chunkSize !== undefined && !(Number.isInteger(chunkSize) && chunkSize > 0)) {
  fail(`--chunk-size wants a positive integer or "default", not ${values['chunk-size']}`);
}

const headers = {};
for (const header of values.header) {
  const colon = header.indexOf(':');
  if (colon < 1) fail(`--header wants 'Name: value', not ${JSON.stringify(header)}`);
  headers[header.slice(0, colon).trim()] = header.slice(colon + 1).trim();
}

const file = positionals[0];
const metadata = { filename: file.split('/').pop() };
for (const pair of values.metadata) {
  const equals = pair.indexOf('=');
  if (equals < 1) fail(`--metadata wants key=value, not ${JSON.stringify(pair)}`);
  metadata[pair.slice(0, equals)] = pair.slice(equals + 1);
}

const size = fs.statSync(file).size;
const started = performance.now();
const options = {
  endpoint: values.endpoint,
  uploadSize: size,
  headers,
  metadata,
  // A benchmark run must fail loudly, not retry its way to a number.
  retryDelays: null,
  onError(error) {
    fail(`tus upload failed: ${error}`);
  },
  onSuccess() {
    const seconds = (performance.now() - started) / 1000;
    const chunk = chunkSize ?? 'default';
    process.stdout.write(`${JSON.stringify({ url: upload.url, size, seconds, chunkSize: chunk })}\n`);
  },
};
if (chunkSize !== undefined) options.chunkSize = chunkSize;
const upload = new tus.Upload(fs.createReadStream(file), options);
upload.start();
