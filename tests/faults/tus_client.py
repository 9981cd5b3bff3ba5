"""tuspy uploading one file to /api/tus/, retrying through any interruption: the fault suite's tus client.

    python -m tests.faults.tus_client SERVER_URL TOKEN FILE [--chunk BYTES]

tuspy's own retry (``retries``, ``retry_delay``): after a failed PATCH it asks
the server for the offset with a HEAD and sends from there, as a tuspy user's
upload does. Prints ``complete <upload id> <size> bytes`` and exits 0 at the end.
"""

import argparse
import hashlib
import logging
import os
import sys
import time

from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed

log = logging.getLogger("tus_client")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("token")
    parser.add_argument("file")
    parser.add_argument("--chunk", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--attempts", type=int, default=100, help="failed PATCHes (or HEADs) in a row before giving up")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    endpoint = args.server.rstrip("/") + "/api/tus/"
    client = tus_client.TusClient(endpoint, headers={"Authorization": f"Token {args.token}"})
    metadata = {"filename": os.path.basename(args.file), "sha256": file_sha256(args.file)}
    # tuspy retries a failed PATCH by itself. Its POST, and the HEAD a new Uploader at a known URL
    # sends first, are retried here, as a tuspy user's script does.
    url, uploader = None, None
    for attempt in range(args.attempts):
        try:
            uploader = client.uploader(
                file_path=args.file, chunk_size=args.chunk, metadata=metadata, url=url,
                retries=args.attempts, retry_delay=1,
            )  # fmt: skip
            uploader.upload()
            break
        except (TusCommunicationError, TusUploadFailed, OSError) as error:
            url = (uploader.url if uploader is not None else None) or url
            log.info("attempt %d at %s: %r", attempt, url, error)
            time.sleep(1)
    else:
        sys.stderr.write("gave up\n")
        return 1
    upload_id = uploader.url.rstrip("/").rsplit("/", 1)[-1]
    # The line the fault suite reads (tests/faults/cluster.py, Client.upload_id).
    sys.stdout.write(f"complete {upload_id} {uploader.get_file_size()} bytes\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
