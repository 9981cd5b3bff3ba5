"""Schemathesis against a real server: the API does exactly what GET /api/schema/ says, and never fails.

One live server (`manage.py serve`, Daphne) on the suite's backend: a fresh
PostgreSQL database and the suite's Redis when DATABASE_URL / REDIS_URL point
there, a SQLite file and the in-memory layer otherwise. Schemathesis (pinned in
requirements.txt) loads the server's own schema and runs every phase
(examples, coverage, fuzzing, stateful) with every check, positive and
negative data, a bounded number of cases per operation, as the staff user's
token, so that every operation is reachable. Its JSON report must list no
failure and no error.

To run the same by hand against `make run`:
    schemathesis --config-file <the CONFIG below> run http://127.0.0.1:8000/api/schema/?format=json \
        --checks all -H "Authorization: Token $TOKEN"
"""

import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest

from tests.faults.tally import TALLY
from tests.support.live_server import LiveServer, postgres_database

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

# Cases per operation and phase: about 1,000 requests in all, well under a minute on two cores.
MAX_EXAMPLES = 60
# Fixed, so that a failure reproduces; DDX_SCHEMATHESIS_SEED explores other cases.
SEED = int(os.environ.get("DDX_SCHEMATHESIS_SEED", "20261201"))
OPERATIONS = 9
RUN_TIMEOUT = 600
MAKE_STAFF = "User.objects.filter(username='staff').update(is_staff=True)"

CONFIG = """
# The contract refuses a size above DIRECTDRIVEX_MAX_FILE_SIZE (outside the schema's maximum)
# with 413 file_too_large, not 400: a 413 is a rejection of negative data for this call.
[[operations]]
include-name = "POST /api/uploads/"
checks.negative_data_rejection.expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]

# Error feedback steers generation by reading 4xx bodies. Its DRF reader walks the whole body, so our
# envelope {"code", "detail", "errors": {"filename": [...]}} makes it invent a request property
# "errors" (with a required "filename") and then flag its absence as data we should have refused.
# It is a generation heuristic, not a check: every check stays on.
[phases.fuzzing.error-feedback]
enabled = false
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server on the suite's backend, with a staff user; yields (server, token)."""
    suite_database = os.environ.get("DATABASE_URL", "")
    with contextlib.ExitStack() as stack:
        if suite_database.startswith(("postgres://", "postgresql://")):
            database_url = stack.enter_context(postgres_database(suite_database, "schemathesis"))
        else:
            database_url = f"sqlite:///{tmp_path_factory.mktemp('schemathesis-db') / 'db.sqlite3'}"
        live = LiveServer(
            tmp_path_factory.mktemp("schemathesis-server"),
            database_url=database_url,
            redis_url=os.environ.get("REDIS_URL") or None,
            # The quota depends on what the user already stores, which no schema can state: with the
            # default, schema-valid POSTs would soon be refused with 413 quota_exceeded.
            DIRECTDRIVEX_USER_QUOTA=2**62,
        )
        live.migrate()
        token = live.create_user("staff")
        live.manage("shell", "-c", f"from django.contrib.auth.models import User; {MAKE_STAFF}")
        stack.callback(live.stop)
        live.start()
        yield live, token


def test_the_server_does_what_its_schema_says_for_every_generated_request(server, tmp_path):
    live, token = server
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report_path = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
        "run", f"{live.url}/api/schema/?format=json",
        "--checks", "all",
        "--header", f"Authorization: Token {token}",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--continue-on-failure",
        "--workers", "1",
        # Nothing is kept between runs (hypothesis' example database would live in the work folder).
        "--generation-database", "none",
        "--report", "json", "--report-json-path", str(report_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)

    output = f"{done.stdout}\n{done.stderr}"
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    cases = report["test_cases"]
    log.info("schemathesis ran %s cases (seed %s): %s", cases["generated"], SEED, cases)
    # The cases schemathesis recorded, each one sent to the server: counted with the fault suite's (tests/faults).
    TALLY.case("OpenAPI operations and cases (schemathesis)", cases["generated"])
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    assert done.returncode == 0, output
    assert report["complete"], output
    assert report["operations"]["tested"] == OPERATIONS, output
    # Every operation got past authentication (the token works, staff reaches /api/slots/).
    assert report["warnings"]["missing_auth"] == [], output
    assert cases["generated"] >= OPERATIONS * MAX_EXAMPLES, output
