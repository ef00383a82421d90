import asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
C = P["c"]
u = urllib.parse.urlsplit(C["url"])
out = {"status": None, "body": None, "extensions": None, "received": [], "close_code": None,
       "close_reason": None, "timed_out": False}
if C["connect_to"]:
    host, port = C["connect_to"].rsplit(":", 1)
    addr = (host.strip("[]"), int(port))
else:
    addr = (u.hostname, u.port or 443)

async def talk():
    ctx = ssl.create_default_context(cafile=P["ca_file"])
    sock = socket.create_connection(addr, timeout=P["timeout"])
    try:
        async with connect(C["url"], sock=sock, ssl=ctx, server_hostname=u.hostname,
                           compression="deflate" if C["deflate"] else None,
                           additional_headers=[tuple(h) for h in C["headers"]],
                           open_timeout=P["timeout"], close_timeout=2) as ws:
            out["extensions"] = ws.response.headers.get("Sec-WebSocket-Extensions")
            try:
                for m in C["send"]:
                    await ws.send(m)
                while True:
                    m = await asyncio.wait_for(ws.recv(), P["timeout"])
                    m = m if isinstance(m, str) else m.decode("utf-8", "replace")
                    out["received"].append(m)
                    if C["until"] and C["until"] in m:
                        break
            except TimeoutError:
                out["timed_out"] = True
            except ConnectionClosed as e:
                if e.rcvd is not None:
                    out["close_code"], out["close_reason"] = e.rcvd.code, e.rcvd.reason
    except InvalidStatus as e:
        out["status"] = e.response.status_code
        out["body"] = e.response.body.decode("utf-8", "replace") if e.response.body else ""

asyncio.run(talk())
print(json.dumps(out))
