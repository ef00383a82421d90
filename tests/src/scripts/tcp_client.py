# A plain TCP client: connects to argv[1]:argv[2] (argv[3] "4" or "6"; an
# AF_INET6 socket may connect to a v4-mapped address), sends one line, reads
# until the peer closes and prints its pid, local address and the reply as JSON.
# With a delay in seconds (argv[4]) it prints "connected" first and waits that
# long before sending, so the connection exists while the caller acts.
import json, os, socket, sys, time
host, port, family = sys.argv[1], int(sys.argv[2]), sys.argv[3]
delay = float(sys.argv[4]) if len(sys.argv) > 4 else None
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(8 if delay is None else 20)
s.connect((host, port))
local = s.getsockname()
if delay is None:
    s.sendall(b"python\n")
else:
    print("connected", flush=True)
    time.sleep(delay)
    s.sendall(b"slow\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(json.dumps({"pid": os.getpid(), "local": [local[0], local[1]], "reply": data.decode()}))
