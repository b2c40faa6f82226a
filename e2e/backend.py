#!/usr/bin/env python3
"""Hidden servers for the end-to-end test, run behind taas-agent (in the hidden server's
network namespace), and a raw mobile client.

    backend.py https PORT CERT KEY TEXT   an HTTPS server answering every GET with TEXT
    backend.py https-many FIRST COUNT CERT KEY PREFIX
                                          COUNT such servers on ports FIRST.., the one on
                                          FIRST+i answering "PREFIX-i" (one hidden server per
                                          label of the scale run, in one process)
    backend.py proxy-echo PORT            reads a PROXY v1 header line and one more line, and
                                          answers "header=<the PROXY line> line=<the line>"
    backend.py tcp-client HOST PORT LINE  connects, sends LINE, prints the first line answered
    backend.py https-session URL CA SECONDS
                                          a mobile client that keeps one connection: asks URL
                                          for its 307, then GETs the Location every 0.5 s on
                                          one kept-alive TLS connection for SECONDS; prints the
                                          count and exits 1 at the first failure or if the
                                          connection was replaced

Each server prints "listening" once its socket is bound, so the caller waits on that, not on
time. Every socket operation has a timeout.
"""

import http.client
import http.server
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse


def https_server(port, ctx, text):
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        # Keep-alive (every answer has its length): a mobile client may hold one connection.
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

        def get_request(self):
            conn, addr = super().get_request()
            conn.settimeout(10)
            return conn, addr

    server = Server(("127.0.0.1", port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def https(port, cert, key, text):
    server = https_server(port, tls_context(cert, key), text)
    print("listening", flush=True)
    server.serve_forever()


def https_many(first, count, cert, key, prefix):
    ctx = tls_context(cert, key)
    servers = [https_server(first + i, ctx, f"{prefix}-{i}") for i in range(count)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


def read_line(conn, limit=512):
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").rstrip("\r\n")


def proxy_echo(port):
    def serve(conn):
        with conn:
            conn.settimeout(10)
            try:
                header = read_line(conn)
                line = read_line(conn)
                conn.sendall(f"header={header} line={line}\n".encode())
            except OSError:
                pass

    sock = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tcp_client(host, port, line):
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(line.encode() + b"\n")
        print(read_line(conn))


def https_session(url, ca, seconds):
    parsed = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context(cafile=ca)
    first = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=ctx, timeout=10)
    first.request("GET", "/")
    answer = first.getresponse()
    answer.read()
    first.close()
    location = answer.getheader("Location")
    if answer.status != 307 or not location:
        sys.exit(f"session: expected a 307, got {answer.status} {location}")
    target = urllib.parse.urlsplit(location)
    conn = http.client.HTTPSConnection(target.hostname, target.port, context=ctx, timeout=10)
    ok, sock, end = 0, None, time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn.request("GET", "/")
            answer = conn.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException) as e:
            sys.exit(f"session: failed after {ok} answers: {e!r}")
        if answer.status != 200 or not body:
            sys.exit(f"session: answer {ok + 1} was {answer.status} {body[:60]!r}")
        if sock is None:
            sock = conn.sock
        elif conn.sock is not sock:
            sys.exit(f"session: the connection was replaced after {ok} answers")
        ok += 1
        time.sleep(0.5)
    conn.close()
    print(f"session: {ok} answers on one connection over {seconds} s", flush=True)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "https" and len(sys.argv) == 6:
        https(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    elif mode == "https-many" and len(sys.argv) == 7:
        https_many(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    elif mode == "proxy-echo" and len(sys.argv) == 3:
        proxy_echo(int(sys.argv[2]))
    elif mode == "tcp-client" and len(sys.argv) == 5:
        tcp_client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif mode == "https-session" and len(sys.argv) == 5:
        https_session(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
