"""IMDS takes a burst of connections in few wake-ups of its event loop (imsa/server/process.py): one look at the
listening socket accepts every connection waiting there (up to ACCEPT_BATCH), and never more than the listener's
connection limit allows. waitress alone takes one per wake-up, and each wake-up asks every open connection whether
it is readable: with 256 SDK clients at once that cost more than answering them."""

import socket

import pytest
from waitress.server import create_server

from imsa.server import process

WAITING = 8


def app(_environ, start_response):
    start_response("204 No Content", [])
    return []


@pytest.fixture
def listener():
    """A waitress server with the service's IMDS settings and batched accepts, its map, and WAITING connections
    already in its accept queue."""
    sock = process.bind_tcp("127.0.0.1", 0)
    shared = {}
    server = create_server(app, sockets=[sock], map=shared, **process.IMDS_SERVER_OPTIONS)
    process._accept_in_batches(server)
    clients = [socket.create_connection(sock.getsockname()[:2], timeout=5) for _ in range(WAITING)]
    yield server, shared
    for client in clients:
        client.close()
    for entry in list(shared.values()):
        if entry is not server:
            entry.close()
    server.task_dispatcher.shutdown(timeout=2)
    server.close()


def test_one_wake_up_accepts_every_waiting_connection(listener):
    server, shared = listener
    before = len(shared)
    server.handle_accept()
    assert len(shared) - before == WAITING
    server.handle_accept()  # nothing waits now: nothing is taken, nothing blocks
    assert len(shared) - before == WAITING


def test_a_batch_stops_at_the_connection_limit(listener):
    server, shared = listener
    server.adj.connection_limit = len(shared) + 3
    server.handle_accept()
    assert len(shared) == server.adj.connection_limit
