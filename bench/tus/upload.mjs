// The tus-js-client uploader of bench/upload.py: one file, PATCHes of --chunk-size bytes (default 4 MiB).
//
//   node upload.mjs --endpoint http://127.0.0.1:P/files/ [--chunk-size N] FILE
//
// Prints one JSON line: {"url", "size", "seconds"}; exits 1 on a failed upload.
import fs from 'node:fs';
import { parseArgs } from 'node:util';

import * as tus from 'tus-js-client';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    endpoint: { type: 'string' },
    'chunk-size': { type: 'string', default: String(4 * 1024 * 1024) },
  },
});

const file = positionals[0];
const size = fs.statSync(file).size;
const started = performance.now();
const upload = new tus.Upload(fs.createReadStream(file), {
  endpoint: values.endpoint,
  chunkSize: Number(values['chunk-size']),
  uploadSize: size,
  metadata: { filename: file.split('/').pop() },
  // A benchmark run must fail loudly, not retry its way to a number.
  retryDelays: null,
  onError(error) {
    process.stderr.write(`tus upload failed: ${error}\n`);
    process.exit(1);
  },
  onSuccess() {
    const seconds = (performance.now() - started) / 1000;
    process.stdout.write(`${JSON.stringify({ url: upload.url, size, seconds })}\n`);
  },
});
upload.start();
