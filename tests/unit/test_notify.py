"""sd_notify: datagrams reach a real AF_UNIX socket, by path and in the abstract namespace."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from vfmos_runtime.notify import (notify, notify_ready, notify_status, notify_stopping,
                                   watchdog_interval)


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


@pytest.fixture
def path_listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


@pytest.fixture
def abstract_listener():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"vfmos-test-notify-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": "@" + name}
    sock.close()


@pytest.mark.parametrize("listener", ["path_listener", "abstract_listener"])
def test_ready_carries_ready_status_and_our_pid(listener, request):
    sock, env = request.getfixturevalue(listener)
    assert notify_ready("serving on /run/vfmos/vfmd.sock", env) is True
    fields = _fields(sock.recv(4096))
    assert fields["READY"] == "1"
    assert fields["MAINPID"] == str(os.getpid())
    assert fields["STATUS"] == "serving on /run/vfmos/vfmd.sock"


def test_stopping_and_status(path_listener):
    sock, env = path_listener
    assert notify_stopping(env)
    assert sock.recv(4096) == b"STOPPING=1"
    assert notify_status("loading\nmodel", env)
    assert sock.recv(4096) == b"STATUS=loading model"  # a newline would end the variable


def test_unset_or_empty_socket_is_false():
    assert notify_ready(env={}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_send_failure_is_false_not_an_exception(tmp_path):
    assert notify_ready(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    assert notify_ready(env={"NOTIFY_SOCKET": "relative/path"}) is False


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
])
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected
