// The @tus/server peer of bench/upload.py: a stock @tus/server 2 with @tus/file-store, or with
// @tus/s3-store (--store s3), on 127.0.0.1 only.
//
//   node server.mjs --port P --dir D [--no-fsync]
//   node server.mjs --port P --store s3 --endpoint URL --bucket B [--region R] [--part-size BYTES]
//
// With --store s3 the credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, addressing
// is path-style, and the part size is --part-size (default 8 MiB, @tus/s3-store's own default).
// The S3 client computes checksums only where an operation requires one, as DirectDriveX's does
// (the AWS SDK's default adds a CRC32 to every part). The store spools each part in os.tmpdir()
// (TMPDIR) before sending it. Its upload is durable when its last PATCH has completed the
// multipart upload, before onUploadFinish: "tus finished" and "tus durable" are then one moment.
//
// Nothing is tuned: the server's defaults (MemoryLocker, no maxSize) and the
// file store as shipped, which never fsyncs. Like the bare consumer, the
// finished file is fsynced once when the last PATCH has landed (onUploadFinish,
// before the 204 goes out), so every peer in the benchmark ends with its bytes
// on disk; --no-fsync leaves that out. Log lines carry the timestamp format of
// Python's logging, which bench/upload.py reads: "tus ready" when the upload is
// created, "tus finished" when its last byte is written, "tus durable" after
// the fsync.
import fs from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { FileStore } from '@tus/file-store';
import { S3Store } from '@tus/s3-store';
import { EVENTS, Server } from '@tus/server';

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    dir: { type: 'string' },
    'no-fsync': { type: 'boolean', default: false },
    store: { type: 'string', default: 'file' },
    endpoint: { type: 'string' },
    bucket: { type: 'string' },
    region: { type: 'string', default: 'us-east-1' },
    'part-size': { type: 'string', default: String(8 * 1024 * 1024) },
  },
});

function stamp() {
  const now = new Date();
  const two = (n) => String(n).padStart(2, '0');
  const date = `${now.getFullYear()}-${two(now.getMonth() + 1)}-${two(now.getDate())}`;
  const time = `${two(now.getHours())}:${two(now.getMinutes())}:${two(now.getSeconds())}`;
  return `${date} ${time},${String(now.getMilliseconds()).padStart(3, '0')}`;
}

function log(message) {
  process.stdout.write(`${stamp()} INFO bench.tus ${message}\n`);
}

const s3 = values.store === 's3';
const directory = s3 ? null : path.resolve(values.dir);
const datastore = s3
  ? new S3Store({
      partSize: Number(values['part-size']),
      s3ClientConfig: {
        bucket: values.bucket,
        endpoint: values.endpoint,
        region: values.region,
        forcePathStyle: true,
        requestChecksumCalculation: 'WHEN_REQUIRED',
        responseChecksumValidation: 'WHEN_REQUIRED',
      },
    })
  : new FileStore({ directory });
const server = new Server({
  path: '/files',
  datastore,
  async onUploadFinish(_req, upload) {
    log(`tus finished id=${upload.id} size=${upload.offset}`);
    if (!s3 && !values['no-fsync']) {
      const handle = await fs.open(path.join(directory, upload.id), 'r+');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
    }
    log(`tus durable id=${upload.id} size=${upload.offset} fsync=${!s3 && !values['no-fsync']} store=${values.store}`);
    return {};
  },
});
server.on(EVENTS.POST_CREATE, (_req, upload) => log(`tus ready id=${upload.id} size=${upload.size}`));

const listener = server.listen({ host: '127.0.0.1', port: Number(values.port) }, () => {
  const where = s3 ? `s3://${values.bucket} at ${values.endpoint}` : `dir=${directory}`;
  log(`tus listening on 127.0.0.1:${values.port} ${where}`);
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => listener.close(() => process.exit(0)));
}
