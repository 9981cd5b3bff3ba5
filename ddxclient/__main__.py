"""Command line of the reference client; exit codes: 0 done, 3 refused, 4 failed, 130 interrupted."""

import argparse
import asyncio
import logging
import os
import sys

from ddxclient.uploader import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_REFUSED, Failed, Refused, Uploader


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddxclient", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload a file (or resume an unfinished upload with --resume)")
    up.add_argument("file")
    up.add_argument("--server", default=os.environ.get("DDX_SERVER", "http://127.0.0.1:8000"))
    up.add_argument("--token", default=os.environ.get("DDX_TOKEN"), help="API token (or DDX_TOKEN)")
    up.add_argument("--resume", metavar="UPLOAD_ID", help="continue this unfinished upload of the same file")
    up.add_argument("--no-sha256", action="store_true", help="don't declare the sha256 up front (still checked)")
    up.add_argument(
        "--max-retries",
        type=int,
        default=50,
        help="retries in a row without progress before giving up (default 50; the count restarts on progress)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=60,
        metavar="SECONDS",
        help="retry a request or connection that shows no sign of life for this long (default 60)",
    )
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if not args.token:
        parser.error("--token or DDX_TOKEN is required")
    if args.timeout <= 0 or args.max_retries < 0:
        parser.error("--timeout must be positive and --max-retries at least 0")

    uploader = Uploader(
        args.server,
        args.token,
        declare_sha256=not args.no_sha256,
        max_retries=args.max_retries,
        progress=not args.quiet,
        timeout=args.timeout,
    )
    try:
        result = asyncio.run(uploader.upload(args.file, resume_id=args.resume))
    except Refused as refusal:
        print(f"refused: {refusal}", file=sys.stderr)
        return EXIT_REFUSED
    except Failed as failure:
        print(f"failed: {failure}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if uploader.upload_id:
            print(f"interrupted; resume with --resume {uploader.upload_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"complete {result['id']} {result['size']} bytes sha256 {result['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
