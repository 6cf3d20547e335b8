"""The uid behind a local TCP connection through one long-lived sock_diag socket (imsa/server/peers.py): every
question gets its own answer, even after an answer to an earlier one was left unread."""

import os
import socket
import struct

from imsa.server import peers


def connection_pair():
    """(listener, client, accepted) on 127.0.0.1."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    return listener, client, accepted


def ends(accepted):
    server_ip, server_port = accepted.getsockname()[:2]
    client_ip, client_port = accepted.getpeername()[:2]
    return peers.unmapped(client_ip), client_port, peers.unmapped(server_ip), server_port


def test_one_netlink_socket_answers_question_after_question():
    listener, client, accepted = connection_pair()
    try:
        assert peers.tcp_peer_uid(accepted) == os.geteuid()
        first = peers._netlink.sock
        assert first is not None, "the socket is kept"
        for _ in range(50):
            assert peers._diag_uid(*ends(accepted)) == os.geteuid()
        assert peers._netlink.sock is first, "and reused"
    finally:
        for sock in (client, accepted, listener):
            sock.close()


def test_an_unread_answer_to_an_earlier_question_is_not_taken_for_the_next_one():
    listener, client, accepted = connection_pair()
    try:
        assert peers.tcp_peer_uid(accepted) == os.geteuid()
        # An answer left queued, as after a question that timed out: a 'no such socket' error for port 1.
        client_ip, client_port, server_ip, _ = ends(accepted)
        nowhere = struct.pack("!HH16s16s", client_port, 1, client_ip.packed.ljust(16, b"\0"),
                              server_ip.packed.ljust(16, b"\0")) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
        body = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + nowhere
        header = struct.pack("=IHHII", 16 + len(body), peers.SOCK_DIAG_BY_FAMILY, peers.NLM_F_REQUEST, 0, 0)
        peers._netlink.sock.sendto(header + body, (0, 0))
        assert peers._diag_uid(*ends(accepted)) == os.geteuid(), "the stale 'none' answer was skipped"
        assert peers._diag_uid(client_ip, client_port, server_ip, 1) is None
    finally:
        for sock in (client, accepted, listener):
            sock.close()
