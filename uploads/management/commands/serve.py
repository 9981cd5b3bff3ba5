"""`manage.py serve`: the one way to start DirectDriveX (make run, production, tests, benchmarks)."""

import logging
import shlex

from django.core.management.base import BaseCommand

from directdrivex import server
from uploads import storage
from uploads.ops import collector

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Start Daphne with WebSocket message/frame limits of twice DIRECTDRIVEX_CHUNK_SIZE "
        "and transport backpressure. System checks run first."
    )

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
        parser.add_argument("--fd", type=int, help="listen on an inherited socket file descriptor instead")
        parser.add_argument(
            "--print", action="store_true", dest="print_only", help="print the Daphne arguments and exit"
        )

    def handle(self, *args, bind, port, fd, print_only, **options):
        arguments = server.daphne_arguments(bind=bind, port=port, fd=fd)
        if print_only:
            self.stdout.write("daphne " + shlex.join(arguments))
            return
        server.limit_malloc_arenas()  # before any thread of ours allocates
        storage.backend().prepare()
        # Multiprocess metrics (PROMETHEUS_MULTIPROC_DIR): clean up after processes that stopped or crashed,
        # and let this one's open-connection gauges go when it stops (uploads.metrics).
        collector.tidy()
        log.info("starting daphne %s", shlex.join(arguments))
        try:
            server.run(arguments)
        finally:
            collector.process_exiting()
