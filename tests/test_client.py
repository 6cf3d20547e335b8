"""The control-plane client's own HTTP/1.1 exchange: what it accepts, and what it reports as an unusable service."""

import os
import socket
import threading

import pytest

from imsa.client import BadAnswer, Client, parse_answer
from imsa.errors import ServiceNotRunning


def test_an_answer_is_cut_to_its_content_length():
    raw = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}trailing'
    assert parse_answer(raw) == (200, b"{}")


def test_an_answer_without_content_length_runs_to_the_close():
    assert parse_answer(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n{\"error\": 1}") == (404, b'{"error": 1}')


@pytest.mark.parametrize("raw", [
    b"",
    b"SSH-2.0-OpenSSH\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
    b"HTTP/1.1 OK\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
])
def test_a_malformed_answer_is_refused(raw):
    with pytest.raises(BadAnswer):
        parse_answer(raw)


def test_a_socket_that_does_not_speak_http_means_no_usable_service(tmp_path):
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def answer_garbage():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"not http at all\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        with pytest.raises(ServiceNotRunning, match="cannot talk"):
            Client(path, timeout=5, expected_uid=os.getuid()).status()
    finally:
        thread.join(timeout=5)
        listener.close()
        os.unlink(path)
