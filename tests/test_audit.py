"""The hash-chained audit log: what a real server writes, what verification catches, and crash safety.

Without a server: the chain (edits, deletions, reordering, rotation) on files real writers made, a
writer process SIGKILLed mid-stream, two processes appending at once, and `inferctl admin audit`.
With one module-scoped server (auth required, keys made in its state.db as tests/test_access.py
does): requests through the real `openai` client, streamed and not, a 401, a local admin action
while the server runs, `/admin/audit`, and no raw key anywhere on disk or in the log.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from inferflux.server.access.audit_chain import GENESIS, log_files, record_hash, tail, verify
from inferflux.server.access.audit_log import Appender
from inferflux.server.access.keys import KeyStore

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}]

# A writer process that appends in a loop (as the server's thread does) until it is killed.
WRITER = """
import sys
from inferflux.server.access.audit_log import AuditLog
log = AuditLog(sys.argv[1], int(sys.argv[2]), 0)
count = int(sys.argv[3])
i = 0
while count < 0 or i < count:
    log.write({"writer": sys.argv[4], "i": i, "tenant": "t", "pad": "x" * 2000})
    if i == 20:
        log.flush()
        print("ready", flush=True)
    i += 1
log.close()
"""


def _write(directory: Path, count: int, max_file_bytes: int = 1 << 20, tenant: str = "acme") -> None:
    appender = Appender(directory, max_file_bytes)
    appender.append([{"i": i, "tenant": tenant if i % 2 else "other", "route": "test"} for i in range(count)])
    appender.close()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferctl.cli", "admin", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"INFERFLUX_HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=60)


# --- the chain, without a server ---


def test_verify_names_the_first_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _write(good, 10)
    verdict = verify(good)
    assert verdict.ok and verdict.records == 10 and verdict.torn is None, verdict.summary()
    first = json.loads(_lines(log_files(good)[0])[0])
    assert first["prev"] == GENESIS and first["hash"] == record_hash(first)

    def broken(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        path = log_files(copy)[0]
        lines = _lines(path)
        path.write_bytes(b"".join(change(lines)))
        return copy

    def edit(lines: list[bytes]) -> list[bytes]:  # one byte: "i":4 -> "i":5 on line 5
        lines[4] = lines[4].replace(b'"i":4', b'"i":5')
        return lines

    cases = {"edited": (edit, 5, "hash mismatch"),
             "deleted": (lambda lines: lines[:3] + lines[4:], 4, "prev mismatch"),
             "reordered": (lambda lines: lines[:6] + [lines[7], lines[6]] + lines[8:], 7, "prev mismatch")}
    for name, (change, line, why) in cases.items():
        verdict = verify(broken(name, change))
        assert not verdict.ok and verdict.problem is not None, name
        assert (verdict.problem.file, verdict.problem.line) == ("audit-000001.jsonl", line), (name, verdict.problem)
        assert why in verdict.problem.why and verdict.records == line - 1, (name, verdict.problem)
    # The CLI: exit 0 on the intact chain, 1 naming file:line and why on a broken one.
    ok = _cli(tmp_path, "audit", "verify", "--dir", str(good))
    assert ok.returncode == 0 and "intact: 10 records" in ok.stdout, ok
    bad = _cli(tmp_path, "audit", "verify", "--dir", str(tmp_path / "edited"))
    assert bad.returncode == 1 and "audit-000001.jsonl:5: hash mismatch" in bad.stderr, bad
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = _cli(tmp_path, "audit", "verify", "--dir", str(tmp_path / "none"))
    assert missing.returncode == 1 and "no audit log" in missing.stderr, missing


def test_rotation_carries_the_chain(tmp_path: Path) -> None:
    _write(tmp_path, 40, max_file_bytes=1200)
    files = log_files(tmp_path)
    assert len(files) >= 4 and [f.name for f in files[:2]] == ["audit-000001.jsonl", "audit-000002.jsonl"]
    assert all(f.stat().st_size <= 1200 for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    for before, after in zip(files, files[1:]):
        assert json.loads(_lines(after)[0])["prev"] == json.loads(_lines(before)[-1])["hash"]
    _write(tmp_path, 5, max_file_bytes=1200)  # a later writer goes on from the newest file
    verdict = verify(tmp_path)
    assert verdict.ok and verdict.records == 45 and verdict.files == len(log_files(tmp_path)), verdict.summary()
    # Losing the end of one file, or a whole file, breaks the first record after the gap.
    second = files[1]
    second.write_bytes(b"".join(_lines(second)[:-1]))
    problem = verify(tmp_path).problem
    assert problem is not None and problem.file == files[2].name and problem.line == 1 and "prev" in problem.why
    shutil.rmtree(tmp_path)
    _write(tmp_path, 40, max_file_bytes=1200)
    log_files(tmp_path)[1].unlink()
    problem = verify(tmp_path).problem
    assert problem is not None and problem.file == "audit-000003.jsonl" and problem.line == 1


def test_a_sigkilled_writer_leaves_a_verifiable_log(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(64 * 1024), "-1", "k"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # it keeps appending (and rotating) until the kill lands mid-stream
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    verdict = verify(tmp_path)
    assert verdict.ok and verdict.records > 20, verdict.summary()
    assert len(log_files(tmp_path)) > 1  # it was rotating too
    # Whether or not the kill tore a line, simulate one: half a record without its newline.
    newest = log_files(tmp_path)[-1]
    if verdict.torn is None:
        with newest.open("ab") as handle:
            handle.write(b'{"i":999,"pad":"xx')
    verdict = verify(tmp_path)
    assert verdict.ok and verdict.torn is not None and verdict.torn.file == newest.name, verdict.summary()
    complete = verdict.records
    reported = _cli(tmp_path, "audit", "verify", "--dir", str(tmp_path))
    assert reported.returncode == 0 and "torn final line" in reported.stdout, reported
    # The next writer cuts the torn tail and chains a repair record in its place.
    _write(tmp_path, 2)
    verdict = verify(tmp_path)
    assert verdict.ok and verdict.torn is None and verdict.records == complete + 3, verdict.summary()
    repair = [r for r in tail(tmp_path, 3)][0]
    assert repair["route"] == "audit.repair" and repair["error"] == "torn_tail" and repair["dropped_bytes"] > 0


def test_two_processes_append_to_one_chain(tmp_path: Path) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "20000", "150", name],
                                stdout=subprocess.DEVNULL, cwd=ROOT) for name in ("a", "b")]
    assert [w.wait(60) for w in writers] == [0, 0]
    verdict = verify(tmp_path)
    assert verdict.ok and verdict.records == 300, verdict.summary()
    records = tail(tmp_path, 300)
    for name in ("a", "b"):  # each writer's records all there, in its own order
        assert [r["i"] for r in records if r["writer"] == name] == list(range(150))


def test_cli_tail(tmp_path: Path) -> None:
    _write(tmp_path / "audit", 12, tenant="acme")
    shown = _cli(tmp_path, "audit", "tail", "-n", "3", "--tenant", "acme", "--json")
    assert shown.returncode == 0, shown
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [r["i"] for r in records] == [7, 9, 11] and {r["tenant"] for r in records} == {"acme"}
    table = _cli(tmp_path, "audit", "tail", "-n", "2")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["TIME", "TENANT", "KEY"]
    assert len(table.stdout.splitlines()) == 3
    assert _cli(tmp_path, "audit", "tail", "--bogus").returncode == 2


# --- against a server ---


@pytest.fixture(scope="module")
def audited(tiny_model):
    from tests.fixtures.server import Server, private_home

    home = private_home()
    store = KeyStore.at_home(home)
    store.create_tenant("acme")
    inference, _ = store.create_key("acme", "inference,models:read")
    admin, _ = store.create_key("acme", "admin")
    server = Server(tiny_model("llama"), "tiny", home=home,
                    extra=["security.auth=required", "audit.max_file_bytes=4096", "audit.fsync_interval_ms=50"])
    yield server, store, {"inference": inference, "admin": admin}
    server.stop()
    store.close()


def _records(server, admin: str, **params: str) -> list[dict]:
    response = httpx.get(server.url + "/admin/audit", params=params, timeout=30,
                         headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _by_id(server, admin: str, request_id: str) -> dict:
    found = [r for r in _records(server, admin, limit="1000") if r.get("request_id") == request_id]
    assert len(found) == 1, request_id
    return found[0]


def test_requests_are_recorded(audited) -> None:
    server, store, keys = audited
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=keys["inference"], max_retries=0)
    key_id = store.authenticate(keys["inference"]).key_id
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=4)
    reply = raw.parse()
    record = _by_id(server, keys["admin"], raw.headers["x-request-id"])
    assert (record["tenant"], record["key_id"], record["route"], record["method"], record["model"],
            record["status"]) == ("acme", key_id, "openai.chat_completions", "POST", "tiny", 200), record
    assert reply.usage is not None
    assert (record["prompt_tokens"], record["completion_tokens"]) == (reply.usage.prompt_tokens,
                                                                     reply.usage.completion_tokens)
    assert record["completion_tokens"] > 0 and record["time"].endswith("Z") and record["error"] is None

    streamed = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in streamed.parse() if chunk.usage is not None][-1]
    record = _by_id(server, keys["admin"], streamed.headers["x-request-id"])
    assert (record["tenant"], record["key_id"], record["status"]) == ("acme", key_id, 200)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)

    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="ifx-" + "B" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    record = _by_id(server, keys["admin"], caught.value.response.headers["x-request-id"])
    assert record["status"] == 401 and record["tenant"] is None and record["key_id"] is None
    assert record["error"] and record["completion_tokens"] == 0


def test_admin_audit_route(audited) -> None:
    server, store, keys = audited
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {keys['inference']}"})
    assert models.status_code == 200
    last = _records(server, keys["admin"], limit="1", tenant="acme")
    assert len(last) == 1 and last[0]["request_id"] == models.headers["x-request-id"]
    assert last[0]["route"] == "openai.list_models"
    for limit in ("0", "abc", "5000"):
        bad = httpx.get(server.url + "/admin/audit", params={"limit": limit},
                        headers={"Authorization": f"Bearer {keys['admin']}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit", (limit, bad.text)
    denied = httpx.get(server.url + "/admin/audit", headers={"Authorization": f"Bearer {keys['inference']}"})
    assert denied.status_code == 403
    assert _records(server, keys["admin"], tenant="nobody") == []
    document = httpx.get(server.url + "/openapi.json").json()
    assert "`admin`" in document["paths"]["/admin/audit"]["get"]["description"]


def test_local_admin_action_joins_the_servers_chain(audited) -> None:
    server, store, keys = audited
    done = _cli(server.home, "tenants", "create", "team-audit")
    assert done.returncode == 0, done.stderr
    failed = _cli(server.home, "tenants", "create", "team-audit")  # exists already: recorded as failed
    assert failed.returncode == 1
    httpx.get(server.url + "/healthz")  # the server appends after the CLI did
    records = [r for r in _records(server, keys["admin"], limit="50") if r["method"] == "CLI"]
    assert [(r["route"], r["subject"], r["status"]) for r in records] == [
        ("inferctl admin tenants create", {"name": "team-audit"}, 0),
        ("inferctl admin tenants create", {"name": "team-audit"}, 1)]
    assert records[0]["actor"].startswith("local:")
    verified = _cli(server.home, "audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout, verified
    assert len(log_files(server.home / "audit")) > 1  # 4 KiB files: the server rotated


def test_cli_tail_through_a_server(audited, tmp_path: Path) -> None:
    """`inferctl admin audit tail --url` reads a running server's log (GET /admin/audit) with an admin key."""
    server, store, keys = audited
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {keys['inference']}"})
    assert models.status_code == 200
    shown = _cli(tmp_path, "audit", "tail", "-n", "1", "--tenant", "acme", "--json", "--url", server.url,
                 "--api-key", keys["admin"])
    assert shown.returncode == 0, shown.stderr
    (line,) = shown.stdout.strip().splitlines()
    assert json.loads(line)["request_id"] == models.headers["x-request-id"]
    denied = _cli(tmp_path, "audit", "tail", "--url", server.url, "--api-key", keys["inference"])
    assert denied.returncode == 1 and "403" in denied.stderr and len(denied.stderr.strip().splitlines()) == 1


def test_cli_verify_through_a_server(audited, tmp_path: Path) -> None:
    """`inferctl admin audit verify --url` checks the server's own chain (GET /admin/audit/verify): exit 0
    while intact, 1 naming the line after a one-byte edit of the server's file, 0 again once it is undone."""
    server, store, keys = audited
    auth = {"Authorization": f"Bearer {keys['inference']}"}
    for _ in range(12):  # enough records that the server has rotated past its first 4 KiB file
        assert httpx.get(server.url + "/v1/models", headers=auth).status_code == 200

    def cli() -> subprocess.CompletedProcess[str]:  # an empty home: the answer can only come from the server
        return _cli(tmp_path, "audit", "verify", "--url", server.url, "--api-key", keys["admin"])

    intact = cli()
    assert intact.returncode == 0 and "audit chain intact" in intact.stdout, intact
    answer = httpx.get(server.url + "/admin/audit/verify", headers={"Authorization": f"Bearer {keys['admin']}"},
                       timeout=30).json()
    counted = int(intact.stdout.split("intact: ")[1].split()[0])
    assert answer["ok"] and answer["first_bad"] is None and answer["files"] >= 2, answer
    assert answer["records"] >= counted >= 12, (answer, intact.stdout)  # each request since adds one
    # One byte of line 3 of the first (rotated, no longer written) file: a digit of its time stamp.
    first = log_files(server.home / "audit")[0]
    data = bytearray(first.read_bytes())
    start = sum(len(line) for line in _lines(first)[:2])
    at = data.index(b'"time":"', start) + len('"time":"') + len("2026-12-02T04:40:00.12")  # the last ms digit
    assert start < at < start + len(_lines(first)[2]) and chr(data[at]).isdigit()
    original = data[at]
    data[at] = ord("0") if original != ord("0") else ord("1")
    first.write_bytes(bytes(data))
    try:
        broken = cli()
        assert broken.returncode == 1, broken
        assert f"{first.name}:3: hash mismatch" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
        answer = httpx.get(server.url + "/admin/audit/verify", timeout=30,
                           headers={"Authorization": f"Bearer {keys['admin']}"}).json()
        assert not answer["ok"] and answer["records"] == 2, answer
        assert answer["first_bad"]["file"] == first.name and answer["first_bad"]["line"] == 3
        assert "hash mismatch" in answer["first_bad"]["reason"]
    finally:
        data[at] = original
        first.write_bytes(bytes(data))
    assert cli().returncode == 0
    denied = _cli(tmp_path, "audit", "verify", "--url", server.url, "--api-key", keys["inference"])
    assert denied.returncode == 1 and "403" in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
    document = httpx.get(server.url + "/openapi.json").json()
    assert "`admin`" in document["paths"]["/admin/audit/verify"]["get"]["description"]


def test_no_key_on_disk_or_in_the_log_and_shutdown_flushes(audited) -> None:
    server, store, keys = audited
    last = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {keys['inference']}"})
    assert server.stop() == 0, server.output()
    verdict = verify(server.home / "audit")
    assert verdict.ok and verdict.torn is None and verdict.records > 8, verdict.summary()
    # Written and fsynced on SIGTERM: the last request before it is the last record.
    assert tail(server.home / "audit", 1)[0]["request_id"] == last.headers["x-request-id"]
    audit = b"".join(p.read_bytes() for p in log_files(server.home / "audit"))
    stored = b"".join(p.read_bytes() for p in server.home.glob("state.db*"))
    log = Path(server.log.name).read_bytes()
    assert audit and stored and b"authorization" not in audit.lower()
    for secret in keys.values():
        for where, data in (("audit", audit), ("state.db", stored), ("server log", log)):
            assert secret.encode() not in data, where
