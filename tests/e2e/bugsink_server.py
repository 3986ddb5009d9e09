"""Install, start and stop Bugsink, a real Sentry-protocol server, on loopback.

Bugsink is a test tool only (source-available licence): it goes into its own virtual
environment (it pins Django and gunicorn versions we must not inherit), never into
apirouter's dependencies. Usable from pytest (``BugsinkServer``) and by hand:

    python tests/e2e/bugsink_server.py start DIR    # prints the DSN, API URL and token as JSON
    python tests/e2e/bugsink_server.py stop DIR
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BUGSINK_VERSION = "2.6.2"
REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("APIROUTER_BUGSINK_VENV", REPO / ".venv-bugsink"))

_PROJECT_SCRIPT = """
import json
from django.contrib.auth import get_user_model
from teams.models import Team
from projects.models import Project
from bsmain.models import AuthToken
get_user_model().objects.create_superuser("admin", "admin@example.invalid", "e2e-only")
team = Team.objects.create(name="apirouter")
project = Project.objects.create(team=team, name="apirouter-e2e")
print("PROJECT " + json.dumps({"dsn": project.dsn, "project": project.id,
                               "token": AuthToken.create_full_access().token}))
"""

_NEW_PROJECT_SCRIPT = """
import json
from teams.models import Team
from projects.models import Project
project = Project.objects.create(team=Team.objects.get(name="apirouter"), name={name!r})
print("PROJECT " + json.dumps({{"dsn": project.dsn, "project": project.id}}))
"""

_ROTATE_KEY_SCRIPT = """
import uuid
from projects.models import Project
project = Project.objects.get(id={project})
project.sentry_key = uuid.uuid4()
project.save()
print("DSN " + project.dsn)
"""

_SETTINGS = """
# --- apirouter e2e overrides ---
DATABASES["default"]["NAME"] = {db!r}
DATABASES["snappea"]["NAME"] = {snappea!r}
BUGSINK["INGEST_STORE_BASE_DIR"] = {ingest!r}
BUGSINK["PHONEHOME"] = False
for _quota in ("MAX_EVENTS_PER_PROJECT_PER_5_MINUTES", "MAX_EVENTS_PER_PROJECT_PER_HOUR",
               "MAX_EVENTS_PER_5_MINUTES", "MAX_EVENTS_PER_HOUR"):
    BUGSINK[_quota] = 1_000_000
"""


def install() -> Path:
    """Create the Bugsink venv once (kept between runs; ~20 s the first time)."""
    marker = VENV / f".bugsink-{BUGSINK_VERSION}"
    if marker.exists():
        return VENV
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"bugsink=={BUGSINK_VERSION}",
        ],
        check=True,
    )
    marker.touch()
    return VENV


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s")
        time.sleep(0.05)


@dataclass
class BugsinkServer:
    """One running Bugsink instance with one project."""

    directory: Path
    port: int
    dsn: str
    project: int
    token: str
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, directory: Path) -> BugsinkServer:
        venv = install()
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        manage = [str(venv / "bin" / "bugsink-manage")]
        run = {"cwd": directory, "check": True, "capture_output": True, "text": True}
        subprocess.run(
            [
                str(venv / "bin" / "bugsink-create-conf"),
                "--template=local",
                "--host=127.0.0.1",
                f"--port={port}",
            ],
            **run,
        )
        with open(directory / "bugsink_conf.py", "a") as conf:
            conf.write(
                _SETTINGS.format(
                    db=str(directory / "db.sqlite3"),
                    snappea=str(directory / "snappea.sqlite3"),
                    ingest=str(directory / "ingestion"),
                )
            )
        subprocess.run([*manage, "migrate", "-v0"], **run)
        subprocess.run([*manage, "migrate", "snappea", "--database=snappea", "-v0"], **run)
        output = subprocess.run([*manage, "shell", "-c", _PROJECT_SCRIPT], **run).stdout
        project = json.loads(output.split("PROJECT ", 1)[1])
        log = open(directory / "gunicorn.log", "w")  # noqa: SIM115 - the server owns it
        process = subprocess.Popen(
            [
                str(venv / "bin" / "gunicorn"),
                f"--bind=127.0.0.1:{port}",
                "--workers=1",
                "--no-control-socket",
                "bugsink.wsgi",
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # detached from our pipes and signals
        )
        (directory / "server.json").write_text(json.dumps({"port": port, "pid": process.pid}))
        server = cls(
            directory, port, project["dsn"], project["project"], project["token"], process.pid
        )
        try:
            wait_for(lambda: port_open(port), 30, "Bugsink did not start listening")
        except TimeoutError:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        """Stop by pid (the whole process group) and wait until the port is closed."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            wait_for(lambda: not port_open(self.port), 15, "Bugsink did not stop")
        except TimeoutError:
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    # --- projects --------------------------------------------------------------------------

    def _shell(self, script: str) -> str:
        return subprocess.run(
            [str(VENV / "bin" / "bugsink-manage"), "shell", "-c", script],
            cwd=self.directory,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def new_project(self, name: str) -> tuple[str, int]:
        """Another project of the same team, so a test counts only its own events:
        (DSN, project id)."""
        output = self._shell(_NEW_PROJECT_SCRIPT.format(name=name))
        project = json.loads(output.split("PROJECT ", 1)[1])
        return project["dsn"], project["project"]

    def rotate_key(self, project: int) -> str:
        """Give the project a new key, as an operator rotating it would: the old DSN is
        refused from now on (Bugsink reads the key per request). Returns the new DSN."""
        output = self._shell(_ROTATE_KEY_SCRIPT.format(project=project))
        return output.split("DSN ", 1)[1].strip()

    # --- reading back what arrived ------------------------------------------------------------

    def api(self, path: str, **params) -> dict:
        response = httpx.get(
            f"{self.url}/api/canonical/0/{path}",
            params=params,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    def issues(self, project: int | None = None) -> list[dict]:
        return self.api("issues/", project=project or self.project)["results"]

    def events_of(self, issue_id: str) -> list[dict]:
        """Every event of an issue (summaries, without data), following the pages."""
        page = self.api("events/", issue=issue_id)
        found = page["results"]
        while page.get("next"):
            response = httpx.get(
                page["next"], headers={"Authorization": f"Bearer {self.token}"}, timeout=10
            )
            response.raise_for_status()
            page = response.json()
            found += page["results"]
        return found

    def event_summaries(self, project: int) -> list[dict]:
        """Every event of a project, without data (cheap enough to poll)."""
        return [e for issue in self.issues(project) for e in self.events_of(issue["id"])]

    def event(self, event_id: str) -> dict:
        """The stored event for an SDK event id (full data: tags, contexts, level...)."""
        return self.api("events/lookup/", project=self.project, event_id=event_id)

    def all_events(self) -> list[dict]:
        """Every stored event, full data."""
        found = []
        for issue in self.issues():
            for summary in self.events_of(issue["id"]):
                found.append(self.api(f"events/{summary['id']}/"))
        return found


def main() -> None:
    command, directory = sys.argv[1], Path(sys.argv[2]).resolve()
    if command == "start":
        server = BugsinkServer.start(directory)
        print(
            json.dumps(
                {
                    "dsn": server.dsn,
                    "url": server.url,
                    "token": server.token,
                    "project": server.project,
                    "pid": server.pid,
                }
            )
        )
    elif command == "stop":
        state = json.loads((directory / "server.json").read_text())
        BugsinkServer(directory, state["port"], "", 0, "", state["pid"]).stop()
    else:
        raise SystemExit("usage: bugsink_server.py start|stop DIR")


if __name__ == "__main__":
    main()
