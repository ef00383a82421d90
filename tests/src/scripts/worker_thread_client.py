# An agent-shaped client: the main thread waits while a worker thread, named
# through prctl(PR_SET_NAME) the way runtimes name theirs ("tokio-rt-worker",
# "HTTP Client"), opens a fresh HTTPS connection per prompt (argv[1], a JSON
# list) to api.openai.com and posts it. Trusts SSL_CERT_FILE. Prints, as JSON,
# the process's pid and name and, per prompt, the local port, the connecting
# thread's id and name, and the status.
import ctypes, http.client, json, os, ssl, sys, threading

PR_SET_NAME = 15
THREAD_NAME = b"agent-worker"
prompts = json.loads(sys.argv[1])
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
libc = ctypes.CDLL(None, use_errno=True)
results = []


def ask(prompt):
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(THREAD_NAME), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
    with open("/proc/thread-self/comm") as f:
        thread = f.read().strip()
    c = http.client.HTTPSConnection("api.openai.com", 443, context=ctx, timeout=10)
    try:
        c.connect()
        port = c.sock.getsockname()[1]
        body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]})
        c.request("POST", "/v1/chat/completions", body=body,
                  headers={"content-type": "application/json", "authorization": "Bearer sk-test"})
        r = c.getresponse()
        results.append({"prompt": prompt, "port": port, "tid": threading.get_native_id(), "thread": thread,
                        "status": r.status, "body": r.read().decode(errors="replace")})
    except Exception as e:
        results.append({"prompt": prompt, "error": repr(e)})
    finally:
        c.close()


for prompt in prompts:
    t = threading.Thread(target=ask, args=(prompt,), name=THREAD_NAME.decode())
    t.start()
    t.join()
with open("/proc/self/comm") as f:
    comm = f.read().strip()
print(json.dumps({"pid": os.getpid(), "comm": comm, "results": results}))
