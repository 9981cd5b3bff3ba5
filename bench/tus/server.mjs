// The @tus/server peer of bench/upload.py: a stock @tus/server 2 with @tus/file-store, on 127.0.0.1 only.
//
//   node server.mjs --port P --dir D [--no-fsync]
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
import { EVENTS, Server } from '@tus/server';

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    dir: { type: 'string' },
    'no-fsync': { type: 'boolean', default: false },
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

const directory = path.resolve(values.dir);
const server = new Server({
  path: '/files',
  datastore: new FileStore({ directory }),
  async onUploadFinish(_req, upload) {
    log(`tus finished id=${upload.id} size=${upload.offset}`);
    if (!values['no-fsync']) {
      const handle = await fs.open(path.join(directory, upload.id), 'r+');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
    }
    log(`tus durable id=${upload.id} size=${upload.offset} fsync=${!values['no-fsync']}`);
    return {};
  },
});
server.on(EVENTS.POST_CREATE, (_req, upload) => log(`tus ready id=${upload.id} size=${upload.size}`));

const listener = server.listen({ host: '127.0.0.1', port: Number(values.port) }, () => {
  log(`tus listening on 127.0.0.1:${values.port} dir=${directory}`);
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => listener.close(() => process.exit(0)));
}
