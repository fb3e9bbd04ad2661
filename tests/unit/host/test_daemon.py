"""ptmigd: a real gRPC server (unix socket, mutual-TLS TCP) over a fake coordinator."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ptmig.v1 import coordinator_pb2 as pb
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc

from host.agent_client.errors import AgentError
from host.daemon import ConfigError, Daemon, ListenConfig, TlsFiles, serve, status_for
from host.daemon import main as daemon
from host.domain.errors import UnknownName
from host.domain.pools import PoolKind
from host.hypervisor import DomainNotFound, HostDenied, HostUnreachable, HypervisorError
from host.migration_options import InvalidMigrationOptions, MigrationStats
from host.workflow.errors import PreflightError
from host.workflow.journal import (
    WorkflowConflict,
    WorkflowKind,
    WorkflowRecord,
    WorkflowState,
)
from host.workflow.lease import LeaseLost
from host.workflow.model import (
    DomainStatus,
    Event,
    MigrationReport,
    MigrationRequest,
    Outcome,
    PhaseTiming,
    PoolStatus,
    WorkflowSummary,
)

CALL_TIMEOUT = 10


class FakeCoordinator:
    """Answers like the workflow's Coordinator; `fail` makes every call raise."""

    def __init__(self) -> None:
        self.requests: list[MigrationRequest] = []
        self.fail: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.finished = threading.Event()
        self.events_after_gate = 0

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    def migrate(
        self, request: MigrationRequest, on_event: Callable[[Event], None]
    ) -> MigrationReport:
        self.requests.append(request)
        self._maybe_fail()
        wid = "wf-1"
        on_event(Event(wid, "preflight", "started"))
        on_event(Event(wid, "preflight", "done", "2 teams"))
        on_event(Event(wid, "migrate", "progress", fraction=0.5))
        assert self.gate.wait(CALL_TIMEOUT)
        on_event(Event(wid, "migrate", "done"))
        self.events_after_gate += 1
        self.finished.set()
        return MigrationReport(
            workflow_id=wid,
            domain=request.domain,
            source_uri=request.source_uri,
            destination_uri=request.destination_uri,
            outcome=Outcome.DONE_DEGRADED,
            phases=[PhaseTiming("switch", 0.25), PhaseTiming("migrate", 3.5, "precopy")],
            teams={"t0": "primary", "t1": "standby"},
            error="",
            migration=MigrationStats(3.5, downtime_ms=42, data_total=2**33),
        )

    def status(self, uri: str, domain: str) -> DomainStatus:
        self._maybe_fail()
        return DomainStatus(domain, "8d3c1f52-5f0e-4a53-9a55-6c1d1c0f2b11", uri, ())

    def pools(self, uri: str) -> list[PoolStatus]:
        self._maybe_fail()
        return []

    def workflows(self, limit: int) -> list[WorkflowSummary]:
        self._maybe_fail()
        return [
            WorkflowSummary(
                "wf-1",
                "migrate",
                RECORD.domain_uuid,
                "vm1",
                "qemu:///system",
                "qemu+ssh://b/system",
                "open",
                "",
                1000.0,
                1001.0,
                True,
                "",
            )
        ]


RECORD = WorkflowRecord(
    id="wf-1",
    kind=WorkflowKind.MIGRATE,
    domain_uuid="8d3c1f52-5f0e-4a53-9a55-6c1d1c0f2b11",
    domain_name="vm1",
    source_uri="qemu:///system",
    destination_uri="qemu+ssh://b/system",
    state=WorkflowState.OPEN,
    outcome=None,
    created=1000.0,
    updated=1001.0,
    owner_pid=1234,
    owner_start=5678,
    owner_boot_id=None,
    request={"domain": "vm1"},
    report=None,
)


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def running(fake: FakeCoordinator, short_tmp: Path) -> Iterator[Daemon]:
    d = serve(fake, ListenConfig(socket=short_tmp / "run" / "ptmigd.sock", threads=4))
    yield d
    fake.gate.set()
    d.stop(grace=1)
    assert d.wait_for_workflows(timeout=CALL_TIMEOUT)


@pytest.fixture
def stub(running: Daemon) -> Iterator[Any]:
    with grpc.insecure_channel(f"unix:{running.socket}") as channel:
        yield pb_grpc.CoordinatorStub(channel)


def migrate_request(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "domain": "vm1",
        "source_uri": "qemu:///system",
        "destination_uri": "qemu+ssh://b/system",
    }
    fields.update(overrides)
    return pb.MigrateRequest(**fields)


# -- Migrate ---------------------------------------------------------------------------


def test_migrate_streams_events_then_the_report(stub: Any, fake: FakeCoordinator) -> None:
    events = list(stub.Migrate(migrate_request(max_downtime_ms=300), timeout=CALL_TIMEOUT))
    assert [(e.phase, e.state) for e in events] == [
        ("preflight", "started"),
        ("preflight", "done"),
        ("migrate", "progress"),
        ("migrate", "done"),
        ("report", "done-degraded"),
    ]
    assert all(e.workflow_id == "wf-1" for e in events)
    assert events[1].message == "2 teams"
    assert [e.HasField("fraction") for e in events[:4]] == [False, False, True, False]
    assert events[2].fraction == 0.5
    assert not any(e.HasField("report") for e in events[:-1])
    report = events[-1].report
    assert report.outcome == pb.OUTCOME_DONE_DEGRADED
    assert report.outcome_text == "done-degraded"
    assert (report.domain, report.source_uri) == ("vm1", "qemu:///system")
    assert [(p.name, p.seconds, p.detail) for p in report.phases] == [
        ("switch", 0.25, ""),
        ("migrate", 3.5, "precopy"),
    ]
    assert dict(report.teams) == {"t0": "primary", "t1": "standby"}
    migration = json.loads(report.migration_json)
    assert (migration["wall_s"], migration["downtime_ms"], migration["data_total"]) == (
        3.5,
        42,
        2**33,
    )
    (request,) = fake.requests
    assert request == MigrationRequest(
        "vm1", "qemu:///system", "qemu+ssh://b/system", max_downtime_ms=300
    )


def test_migrate_request_fields_map_to_the_workflow_request(
    stub: Any, fake: FakeCoordinator
) -> None:
    list(
        stub.Migrate(
            migrate_request(unsafe=True, peer_uri="qemu+tcp://b/system"), timeout=CALL_TIMEOUT
        )
    )
    (request,) = fake.requests
    assert request.unsafe and request.peer_uri == "qemu+tcp://b/system"
    assert request.max_downtime_ms is None


@pytest.mark.parametrize("missing", ["domain", "source_uri", "destination_uri"])
def test_migrate_requires_domain_and_uris(stub: Any, fake: FakeCoordinator, missing: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Migrate(migrate_request(**{missing: ""}), timeout=CALL_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing in caught.value.details()
    assert fake.requests == []


ERRORS: list[tuple[BaseException, grpc.StatusCode]] = [
    (WorkflowConflict(RECORD, owner_alive=True), grpc.StatusCode.ALREADY_EXISTS),
    (PreflightError("guest agent too old"), grpc.StatusCode.FAILED_PRECONDITION),
    (DomainNotFound("no domain vm1", 42), grpc.StatusCode.NOT_FOUND),
    (UnknownName("vm1 has no team 'x'"), grpc.StatusCode.NOT_FOUND),
    (InvalidMigrationOptions("bandwidth 0"), grpc.StatusCode.INVALID_ARGUMENT),
    (HostDenied("authentication failed", 45), grpc.StatusCode.PERMISSION_DENIED),
    (AgentError("DEADLINE_EXCEEDED", "no answer"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (HostUnreachable("host b down", 38), grpc.StatusCode.UNAVAILABLE),
    (LeaseLost("vm1: the lease is now held by another"), grpc.StatusCode.ABORTED),
    (HypervisorError("attach: QEMU said no", 1), grpc.StatusCode.UNKNOWN),
    # Not raised on purpose: a defect of ptmig, whatever its builtin type.
    (RuntimeError("boom\nTraceback (most recent call last):\n  File x"), grpc.StatusCode.INTERNAL),
    (LookupError("a KeyError escaped"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("error", "code"), ERRORS, ids=lambda v: type(v).__name__)
def test_workflow_exceptions_map_to_status_codes(
    stub: Any, fake: FakeCoordinator, error: BaseException, code: grpc.StatusCode
) -> None:
    fake.fail = error
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Migrate(migrate_request(), timeout=CALL_TIMEOUT))
    assert caught.value.code() == code
    details = caught.value.details()
    assert "\n" not in details
    assert str(error).splitlines()[0] in details
    with pytest.raises(grpc.RpcError) as unary:
        stub.GetStatus(pb.GetStatusRequest(domain="vm1"), timeout=CALL_TIMEOUT)
    assert unary.value.code() == code


def test_conflict_names_the_open_workflow() -> None:
    code, message = status_for(WorkflowConflict(RECORD, owner_alive=False))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "wf-1" in message and "ptmig recover" in message


def test_internal_errors_keep_tracebacks_in_the_log(
    stub: Any, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail = KeyboardInterrupt()  # not even an Exception: still a status, not a crash
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Migrate(migrate_request(), timeout=CALL_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "KeyboardInterrupt" in caught.value.details()
    fake.fail = RuntimeError("kaput")
    with caplog.at_level(logging.ERROR, logger="ptmig.daemon"), pytest.raises(grpc.RpcError):
        stub.ListPools(pb.ListPoolsRequest(), timeout=CALL_TIMEOUT)
    assert any(r.exc_info and "kaput" in r.getMessage() for r in caplog.records)


def test_client_going_away_does_not_stop_the_migration(
    stub: Any,
    fake: FakeCoordinator,
    running: Daemon,
    caplog: pytest.LogCaptureFixture,
    logged: Callable[..., threading.Event],
) -> None:
    fake.gate.clear()
    caplog.set_level(logging.INFO, logger="ptmig.daemon")
    went_away = logged("ptmig.daemon", "went away")
    call = stub.Migrate(migrate_request(), timeout=CALL_TIMEOUT)
    first = next(call)
    assert first.phase == "preflight"
    call.cancel()
    assert went_away.wait(CALL_TIMEOUT), "the cancellation was not logged"
    assert not fake.finished.is_set()  # still running, not abandoned
    fake.gate.set()
    assert running.wait_for_workflows(timeout=CALL_TIMEOUT)
    assert fake.finished.is_set() and fake.events_after_gate == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("workflow wf-1 ended done-degraded" in m for m in messages)
    assert any("continues without it" in m and "wf-1" in m for m in messages)


# -- the other RPCs --------------------------------------------------------------------


def test_get_status_requires_a_domain_and_defaults_the_uri(stub: Any) -> None:
    reply = stub.GetStatus(pb.GetStatusRequest(domain="vm1"), timeout=CALL_TIMEOUT)
    assert (reply.domain, reply.uri) == ("vm1", "qemu:///system")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetStatus(pb.GetStatusRequest(uri="qemu:///system"), timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unencodable_answer_is_internal(stub: Any, fake: FakeCoordinator) -> None:
    fake.pools = lambda uri: [  # type: ignore[method-assign]
        PoolStatus("x", PoolKind.PCI, "many", 0)  # type: ignore[arg-type]
    ]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListPools(pb.ListPoolsRequest(), timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "cannot encode" in caught.value.details()


# -- the unix socket -------------------------------------------------------------------


def test_socket_is_0600_in_a_0700_directory(running: Daemon) -> None:
    assert stat.S_ISSOCK(os.lstat(running.socket).st_mode)
    assert stat.S_IMODE(os.lstat(running.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(running.socket.parent).st_mode) == 0o700


CONNECT_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__)
else:
    print("connected")
"""


def connect_as_nobody(path: Path) -> str:
    def drop() -> None:
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(
        ["/usr/bin/python3", "-c", CONNECT_AS_NOBODY, str(path)],
        capture_output=True,
        text=True,
        preexec_fn=drop,
        timeout=30,
        check=True,
    ).stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_user_other_than_root_cannot_connect(running: Daemon, short_tmp: Path) -> None:
    short_tmp.chmod(0o755)  # only ptmigd's own directory and socket stand in the way
    assert connect_as_nobody(running.socket) == "PermissionError"
    running.socket.parent.chmod(0o755)  # an operator loosened the directory: the socket holds
    try:
        assert connect_as_nobody(running.socket) == "PermissionError"
        running.socket.chmod(0o666)  # the check itself can fail: loosen the socket too
        assert connect_as_nobody(running.socket) == "connected"
    finally:
        running.socket.chmod(0o600)
        running.socket.parent.chmod(0o700)


def test_socket_directory_must_be_private(fake: FakeCoordinator, short_tmp: Path) -> None:
    wide = short_tmp / "wide"
    wide.mkdir(mode=0o755)
    wide.chmod(0o755)
    with pytest.raises(ConfigError, match="0755"):
        serve(fake, ListenConfig(socket=wide / "ptmigd.sock"))
    assert not (wide / "ptmigd.sock").exists()
    real = short_tmp / "real"
    real.mkdir(mode=0o700)
    (short_tmp / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="symlink"):
        serve(fake, ListenConfig(socket=short_tmp / "link" / "ptmigd.sock"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another uid")
def test_socket_directory_owned_by_another_user_is_refused(
    fake: FakeCoordinator, short_tmp: Path
) -> None:
    other = short_tmp / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        serve(fake, ListenConfig(socket=other / "ptmigd.sock"))


def test_stale_socket_is_replaced_but_a_live_one_is_not(
    fake: FakeCoordinator, short_tmp: Path
) -> None:
    directory = short_tmp / "run"
    directory.mkdir(mode=0o700)
    path = directory / "ptmigd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = serve(fake, ListenConfig(socket=path, threads=2))
    try:
        with pytest.raises(ConfigError, match="already running"):
            serve(fake, ListenConfig(socket=path, threads=2))
        with grpc.insecure_channel(f"unix:{path}") as channel:  # the first still answers
            pb_grpc.CoordinatorStub(channel).ListWorkflows(
                pb.ListWorkflowsRequest(), timeout=CALL_TIMEOUT
            )
    finally:
        first.stop(grace=1)
    assert not path.exists()
    (directory / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        serve(fake, ListenConfig(socket=directory / "file"))


# -- TCP and mutual TLS ----------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _leaf(cwd: Path, ca: str, name: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with server and client certificates, and a second, foreign CA."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    cwd = tmp_path_factory.mktemp("pki")
    _ca(cwd, "ca")
    _ca(cwd, "other-ca")
    _leaf(cwd, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _leaf(cwd, "ca", "client", "extendedKeyUsage=clientAuth")
    _leaf(cwd, "other-ca", "intruder", "extendedKeyUsage=clientAuth")
    return cwd


@pytest.fixture
def tls_daemon(fake: FakeCoordinator, short_tmp: Path, pki: Path) -> Iterator[Daemon]:
    d = serve(
        fake,
        ListenConfig(
            socket=short_tmp / "run" / "ptmigd.sock",
            tcp="127.0.0.1:0",
            tls=TlsFiles(pki / "server.crt", pki / "server.key", pki / "ca.crt"),
            threads=4,
        ),
    )
    yield d
    d.stop(grace=1)


def _tls_call(port: int, pki: Path, client: str | None) -> Any:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.crt").read_bytes() if client else None,
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return pb_grpc.CoordinatorStub(channel).ListWorkflows(
            pb.ListWorkflowsRequest(limit=1), timeout=5
        )


def test_tcp_with_a_client_certificate_from_the_ca_works(tls_daemon: Daemon, pki: Path) -> None:
    assert tls_daemon.tcp_port
    reply = _tls_call(tls_daemon.tcp_port, pki, "client")
    assert [w.id for w in reply.workflows] == ["wf-1"]


@pytest.mark.parametrize("client", [None, "intruder"], ids=["no-cert", "foreign-ca"])
def test_tcp_refuses_clients_without_a_valid_certificate(
    tls_daemon: Daemon, pki: Path, client: str | None, fake: FakeCoordinator
) -> None:
    assert tls_daemon.tcp_port
    with pytest.raises(grpc.RpcError) as caught:
        _tls_call(tls_daemon.tcp_port, pki, client)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tcp_refuses_plaintext_clients(tls_daemon: Daemon) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_daemon.tcp_port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListWorkflows(pb.ListWorkflowsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tcp_without_tls_is_refused_at_start(
    fake: FakeCoordinator, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="without mutual TLS"):
        serve(fake, ListenConfig(socket=short_tmp / "run" / "s.sock", tcp="127.0.0.1:0"))
    sock = short_tmp / "run2" / "s.sock"
    status = daemon.main(["--socket", str(sock), "--listen-tcp", "127.0.0.1:0"], coordinator=fake)
    assert status == 2
    assert "without mutual TLS" in capsys.readouterr().err
    assert not sock.parent.exists()  # refused before touching anything
    status = daemon.main(
        ["--socket", str(sock), "--listen-tcp", "127.0.0.1:0", "--tls-cert", "/x"],
        coordinator=fake,
    )
    assert status == 2
    assert "go together" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["127.0.0.1", ":80", "host:port", "h:99999"])
def test_bad_listen_address(listen: str) -> None:
    tls = TlsFiles(Path("c"), Path("k"), Path("ca"))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ListenConfig(tcp=listen, tls=tls).check()


def test_missing_tls_file_is_a_config_error(fake: FakeCoordinator, short_tmp: Path) -> None:
    tls = TlsFiles(short_tmp / "no.crt", short_tmp / "no.key", short_tmp / "no-ca.crt")
    with pytest.raises(ConfigError, match="cannot read TLS"):
        serve(fake, ListenConfig(socket=short_tmp / "s.sock", tcp="127.0.0.1:0", tls=tls))


# -- main ------------------------------------------------------------------------------


def test_main_serves_until_sigterm(fake: FakeCoordinator, short_tmp: Path) -> None:
    sock = short_tmp / "run" / "ptmigd.sock"
    answers: list[int] = []

    def client() -> None:
        deadline = time.monotonic() + CALL_TIMEOUT
        try:
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                reply = pb_grpc.CoordinatorStub(channel).ListWorkflows(
                    pb.ListWorkflowsRequest(), timeout=CALL_TIMEOUT, wait_for_ready=True
                )
                answers.append(len(reply.workflows))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=client)
    thread.start()
    assert daemon.main(["--socket", str(sock)], coordinator=fake) == 0
    thread.join()
    assert answers == [1]
    assert not sock.exists()
    assert signal.getsignal(signal.SIGTERM) is before
