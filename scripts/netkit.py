#!/usr/bin/env python3
"""Backends and clients for scripts/container.sh test, on loopback only.

  netkit.py http PORT NAME            HTTP server: every request gets "NAME\\n"
  netkit.py echo PORT                 echo server
  netkit.py hold ADDR LINE SECONDS    one connection: sends LINE (a preamble,
                                      "\\r\\n" added), then a ping every 50 ms
                                      for SECONDS, each echoed; then closes
                                      and expects the end of the stream
  netkit.py bulk ADDR LINE BYTES     one connection: sends LINE, then BYTES
                                      random bytes while it reads their echo;
                                      fails unless the echo is the same
  netkit.py load ADDR HOST COUNT PARALLEL RATE SECONDS
                                      COUNT short HTTP requests (Host: HOST),
                                      PARALLEL at a time, at most RATE a
                                      second, within SECONDS; prints the
                                      answers by body and fails if any
                                      request failed or was not made

Servers run until killed; every client is bounded in count and time.
"""
import collections
import hashlib
import http.server
import os
import socket
import socketserver
import sys
import threading
import time


def serve_http(port, name):
    body = (name + "\n").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def serve_echo(port):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()


def parse_addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"stream ended after {len(data)} of {n} bytes")
        data += chunk
    return data


def hold(addr, line, seconds):
    sock = socket.create_connection(parse_addr(addr), timeout=10)
    sock.sendall(line.encode() + b"\r\n")
    started = time.monotonic()
    trips = 0
    while True:
        ping = f"ping {trips}\n".encode()
        sock.sendall(ping)
        if recv_exact(sock, len(ping)) != ping:
            raise ConnectionError(f"round trip {trips}: the echo differs")
        trips += 1
        if time.monotonic() - started >= seconds:
            break
        time.sleep(0.05)
    sock.shutdown(socket.SHUT_WR)
    if sock.recv(1) != b"":
        raise ConnectionError("bytes after the last echo")
    print(f"held: {trips} round trips over {time.monotonic() - started:.1f} s, closed cleanly")


def bulk(addr, line, size):
    sock = socket.create_connection(parse_addr(addr), timeout=10)
    sock.sendall(line.encode() + b"\r\n")
    payload = os.urandom(size)
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    echoed = recv_exact(sock, size)
    sender.join()
    sock.shutdown(socket.SHUT_WR)
    if sock.recv(1) != b"":
        raise ConnectionError("bytes after the echo")
    if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
        raise ConnectionError("the echo differs")
    print(f"bulk: {size} bytes echoed intact")


def load(addr, host, count, parallel, rate, seconds):
    started = time.monotonic()
    deadline = started + seconds
    answers = collections.Counter()
    failures = []
    lock = threading.Lock()
    todo = iter(range(count))
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            # Request i starts no earlier than i / RATE seconds in.
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            try:
                with socket.create_connection(parse_addr(addr), timeout=5) as sock:
                    sock.sendall(request)
                    response = b""
                    while chunk := sock.recv(65536):
                        response += chunk
                head, _, body = response.partition(b"\r\n\r\n")
                status = head.split(b"\r\n")[0].split(b" ")
                if len(status) < 2 or status[1] != b"200":
                    raise ConnectionError(f"answer {head[:40]!r}")
                with lock:
                    answers[body.decode().strip()] += 1
            except (OSError, ConnectionError) as e:
                with lock:
                    failures.append(f"request {i}: {e}")

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sum(answers.values())
    took = time.monotonic() - started
    print(f"load: {done} of {count} requests answered in {took:.1f} s, {len(failures)} failed; by backend: "
          + ", ".join(f"{k}={v}" for k, v in sorted(answers.items())))
    for failure in failures[:10]:
        print(f"load: {failure}")
    if failures or done != count:
        sys.exit(1)


def main(args):
    match args:
        case ["http", port, name]:
            serve_http(int(port), name)
        case ["echo", port]:
            serve_echo(int(port))
        case ["hold", addr, line, seconds]:
            hold(addr, line, float(seconds))
        case ["bulk", addr, line, size]:
            bulk(addr, line, int(size))
        case ["load", addr, host, count, parallel, rate, seconds]:
            load(addr, host, int(count), int(parallel), float(rate), float(seconds))
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
