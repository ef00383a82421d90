GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

class Conn:
    def __init__(self, sock, pending):
        self.sock, self.buf = sock, pending

    def exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed mid-frame")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def recv(self):
        b0, b1 = self.exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self.exact(2), "big")
        elif n == 127:
            n = int.from_bytes(self.exact(8), "big")
        mask = self.exact(4) if b1 & 0x80 else None
        payload = self.exact(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return b0 & 0x0F, payload

def run():
    u = urllib.parse.urlsplit(P["url"])
    host, port = u.hostname, u.port or 443
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    raw = socket.create_connection((host, port), timeout=P["timeout"])
    sock = context().wrap_socket(raw, server_hostname=host)
    cert = sock.getpeercert()
    key = base64.b64encode(os.urandom(16)).decode()
    host_header = host if port == 443 else f"{host}:{port}"
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed during the upgrade: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [[k.strip().lower(), v.strip()] for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)]
    accept = dict(headers).get("sec-websocket-accept")
    expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    out = {"status": status, "headers": headers, "accept_ok": accept == expected,
           "echoes": [], "closed_cleanly": False, "issuer": dn(cert["issuer"]),
           "subject": dn(cert["subject"]), "local_port": sock.getsockname()[1]}
    if status != 101:
        sock.close()
        return out
    ws = Conn(sock, rest)
    for m in P["messages"]:
        ws.send(0x1, m.encode())
        while True:
            opcode, payload = ws.recv()
            if opcode not in (0x9, 0xA):
                break
        out["echoes"].append({"opcode": opcode, "text": payload.decode("utf-8", "replace")})
    ws.send(0x8, (1000).to_bytes(2, "big"))
    try:
        opcode, _ = ws.recv()
        out["closed_cleanly"] = opcode == 0x8
    except Exception:
        pass
    sock.close()
    return out

try:
    main()
except Exception as e:
    fail(e)
