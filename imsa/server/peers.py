"""Who is at the other end of a connection to the service: SO_PEERCRED for the control socket, and the user
owning the client's socket of a local TCP connection (IMDS serves only the owner's processes and root's).

The command line imports this module for peer_credentials alone, at the start of every ``imsa export``: what only
the service's TCP lookups need (ipaddress) is imported by the functions that use it.
"""

import _thread
import errno
import itertools
import os
import socket
import struct
import sys


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


# Looking up who owns the client's end of a local TCP connection (Linux). sock_diag answers one exact 4-tuple in
# microseconds; /proc/net/tcp is the fallback where netlink is not allowed, and costs a scan of every socket
# (tens of thousands of TIME_WAIT lines after a busy minute of one-request connections).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
# TCP states that no longer have an owner (uid 0 is shown for them): TIME_WAIT, CLOSE.
_OWNERLESS = (6, 7)
# A socket its process has closed (an orphan: FIN-WAIT-1/2, LAST-ACK, CLOSING) keeps its state but loses its file:
# inode 0, and uid 0 is shown for it. A client that sends a request and closes before the service accepts the
# connection looked like root's; no inode means no owner, so the uid is unknown (and the client refused).
_NO_INODE = 0


def is_local_peer(peer, listen_ip=None):
    """True for a loopback peer address, or *listen_ip* itself (IPv4-mapped IPv6 counts as IPv4; a zone is ignored)."""
    try:
        peer_ip = unmapped(peer)
    except ValueError:
        return False
    return peer_ip.is_loopback or peer_ip == listen_ip


def unmapped(ip):
    import ipaddress

    ip = ipaddress.ip_address(ip.split("%", 1)[0])
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


class _Netlink:
    """One sock_diag socket for the life of the process, one question at a time: opening and closing a netlink
    socket for each new connection cost more than the question itself (a burst of SDK clients opens hundreds)."""

    def __init__(self):
        self.lock = _thread.allocate_lock()  # threading.Lock() without importing threading
        self.sock = None
        self.sequence = itertools.count(1)

    def ask(self, flags, body):
        """Send one sock_diag request (*flags*, *body*) under a sequence number of its own, and return the answer
        that carries that number; OSError when netlink cannot be used here."""
        with self.lock:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
                self.sock.settimeout(1)
            number = next(self.sequence) & 0xFFFFFFFF
            header = struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, flags, number, 0)
            try:
                self.sock.sendto(header + body, (0, 0))
                for _ in range(NETLINK_STALE_ANSWERS):
                    answer = self.sock.recv(65536)
                    # An answer to an earlier question that timed out is still queued: skip it.
                    if len(answer) >= 16 and struct.unpack_from("=I", answer, 8)[0] == number:
                        return answer
                raise OSError(errno.EPROTO, "sock_diag: no answer to this question")
            except OSError:
                self.sock.close()  # a fresh socket next time: nothing stale is read again
                self.sock = None
                raise


# Answers to earlier questions read past before giving up on one (each of those had timed out).
NETLINK_STALE_ANSWERS = 8
_netlink = _Netlink()


def tcp_socket(client_ip, client_port, server_ip, server_port):
    """sock_diag: (state, uid, inode) of the TCP socket whose local end is client_ip:port and remote end
    server_ip:port (ip_address objects), None if there is none; OSError when netlink cannot be used here."""
    family = socket.AF_INET if client_ip.version == server_ip.version == 4 else socket.AF_INET6

    def packed(ip):
        if family == socket.AF_INET6 and ip.version == 4:
            import ipaddress

            ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        return ip.packed.ljust(16, b"\0")

    sockid = struct.pack("!HH16s16s", client_port, server_port, packed(client_ip), packed(server_ip))
    sockid += struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    answer = _netlink.ask(NLM_F_REQUEST, body)
    kind = struct.unpack_from("=H", answer, 4)[0] if len(answer) >= 16 else None
    if kind == NLMSG_ERROR and len(answer) >= 20:
        code = -struct.unpack_from("=i", answer, 16)[0]
        if code == errno.ENOENT:
            return None  # no such socket
        raise OSError(code, "sock_diag: " + os.strerror(code))  # e.g. inet_diag missing: fall back to /proc
    if kind != SOCK_DIAG_BY_FAMILY or len(answer) < 16 + 72:
        raise OSError(errno.EPROTO, "sock_diag: unexpected answer")
    # struct inet_diag_msg: family, state, timer, retrans (1 byte each), the 48-byte sockid, expires, rqueue,
    # wqueue, then uid at offset 64 and inode at 68.
    state = answer[16 + 1]
    uid, inode = struct.unpack_from("=II", answer, 16 + 64)
    return state, uid, inode


def _diag_uid(client_ip, client_port, server_ip, server_port):
    """sock_diag: the uid of the TCP socket whose local end is client_ip:port and remote end server_ip:port,
    None if there is none (or it has no owner any more); OSError when netlink cannot be used here."""
    found = tcp_socket(client_ip, client_port, server_ip, server_port)
    if found is None:
        return None
    state, uid, inode = found
    return None if state in _OWNERLESS or inode == _NO_INODE else uid


def _proc_net_address(ip, port, v6_table):
    """How /proc/net/tcp (or tcp6) writes ip:port: 32-bit words in host (little-endian) order, in hex."""
    if ip.version == 4 and v6_table:
        import ipaddress

        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    packed = ip.packed
    words = "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}".encode()


def _proc_uid(client_ip, client_port, server_ip, server_port):
    """The same lookup by scanning /proc/net/tcp and tcp6 (read as bytes: after the privilege drop, codecs not yet
    loaded may be unreadable, as a stdlib under /root is)."""
    for table, v6_table in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not v6_table and 6 in (client_ip.version, server_ip.version):
            continue
        client = _proc_net_address(client_ip, client_port, v6_table)
        server = _proc_net_address(server_ip, server_port, v6_table)
        try:
            with open(table, "rb") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    # sl, local, remote, st, tx:rx queues, tr:when, retransmits, uid, timeout, inode
                    if len(fields) > 9 and fields[1] == client and fields[2] == server:
                        if int(fields[3], 16) in _OWNERLESS or int(fields[9]) == _NO_INODE:
                            return None
                        return int(fields[7])
        except (OSError, ValueError):
            continue
    return None


def tcp_peer_uid(sock):
    """The uid owning the other end of an accepted TCP connection from this machine (Linux), else None."""
    try:
        server_ip, server_port = sock.getsockname()[:2]
        client_ip, client_port = sock.getpeername()[:2]
        server_ip, client_ip = unmapped(server_ip), unmapped(client_ip)
    except (OSError, ValueError):
        return None
    try:
        return _diag_uid(client_ip, client_port, server_ip, server_port)
    except OSError:
        return _proc_uid(client_ip, client_port, server_ip, server_port)


def peer_uids_visible():
    """True when this process can tell which user owns a local TCP connection (sock_diag or /proc/net/tcp)."""
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG).close()
        return True
    except OSError:
        return os.access("/proc/net/tcp", os.R_OK)
