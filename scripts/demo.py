"""The main job: start the engine, prepare the bundled two-step example on the host runtime,
start an instance and query it through its DSN. Cleans up after itself."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUERY = """select c.name, c.city, count(o.id) as orders, sum(o.amount) as total
from customers c left join orders o on o.customer_id = c.id
group by c.name, c.city order by total desc"""


class Client:
    def __init__(self, endpoint: str, token: str) -> None:
        self.host, port = endpoint.rsplit(":", 1)
        self.port = int(port)
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload,
                     headers={"Authorization": f"Bearer {self.token}"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data


def start_engine(state_dir: Path, engine_cmd: list[str]) -> tuple[subprocess.Popen[bytes], Client]:
    engine_json = state_dir / "engine.json"
    proc = subprocess.Popen([*engine_cmd, "--listen", "127.0.0.1:0", "--write-engine-json",
                             str(engine_json), "--idle-timeout", "5m"], cwd=ROOT)
    deadline = time.monotonic() + 5
    while not engine_json.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("engine did not start")
        time.sleep(0.02)
    info = json.loads(engine_json.read_text())
    return proc, Client(info["endpoint"], info["authToken"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, help="engine state dir (default: a temp dir)")
    parser.add_argument("--image", default="host:15")
    parser.add_argument("--engine", nargs="+", default=[sys.executable, "-m", "sqlrs_engine"],
                        help="engine command line (e.g. python3 dist/sqlrs-engine.pyz)")
    args = parser.parse_args()
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="sqlrs-demo-"))
    proc, client = start_engine(state_dir, args.engine)
    try:
        steps = [str(ROOT / "examples" / name) for name in ("01_schema.sql", "02_data.sql")]
        status, body = client.call("POST", "/v1/prepare-jobs", {
            "prepare_kind": "psql", "image_id": args.image,
            "psql_args": ["-f", steps[0], "-f", steps[1]]})
        if status != 201:
            raise SystemExit(f"prepare rejected: {body.decode()}")
        job = json.loads(body)
        print(f"prepare job {job['job_id']}")
        _, events = client.call("GET", job["events_url"])
        for line in events.splitlines():
            event = json.loads(line)
            if event["type"] in ("log", "status"):
                print(f"  {event.get('status') or event.get('message')}")
        _, body = client.call("GET", job["status_url"])
        final = json.loads(body)
        if final["status"] != "succeeded":
            raise SystemExit(f"prepare failed: {final.get('error')}")
        result = final["result"]
        dsn = urllib.parse.urlsplit(result["dsn"])
        password = urllib.parse.unquote(dsn.password or "")
        bare = dsn._replace(netloc=f"{dsn.username}@{dsn.hostname}:{dsn.port}").geturl()
        print(f"DSN={bare} (with the instance's password)")
        print(f"state {result['state_id']}")
        out = subprocess.run(["/usr/lib/postgresql/15/bin/psql", "-X", bare, "-c", QUERY],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PGPASSWORD": password})  # never in argv
        print(out.stdout)
        client.call("DELETE", f"/v1/instances/{result['instance_id']}?force=true")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
