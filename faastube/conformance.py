"""``faastube conformance URL``: the stock OpenWhisk Python runtime's behaviours as black-box
checks against any runtime endpoint (ours, or a stock one), over HTTP.

The endpoint must be a fresh, uninitialised runtime container: the checks run in an order
that leaves it in a known state (failed inits first, then one init, runs, and the action's
exit last). Sentinel checks read the runtime's logs (``--stdout``/``--stderr`` files);
without them those checks are skipped, and the output says so.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import sys
import time
import urllib.parse
import zipfile

SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"

TEST_ACTION = '''
import os, sys
def main(args):
    kind = args.get("kind")
    if kind == "list":
        return [1, 2]
    if kind == "error":
        return {"error": "sorry"}
    if kind == "raise":
        raise ValueError("conformance exception")
    if kind == "string":
        return "not a dict"
    if kind == "none":
        return None
    if kind == "init env":
        return {k: os.environ.get(k) for k in ("FT_OBJECT", "FT_NUMBER", "FT_TEXT")}
    if kind == "env":
        return {k: v for k, v in os.environ.items() if k.startswith("__OW_") and k not in ("__OW_API_HOST", "__OW_ALLOW_CONCURRENT")}
    if kind == "exit":
        sys.exit(1)
    print("conformance stdout")
    print("conformance stderr", file=sys.stderr)
    return args
'''


class Endpoint:
    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        self.prefix = parts.path.rstrip("/")

    def post(self, path: str, body) -> tuple[int, bytes, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.connection.request("POST", self.prefix + path, data, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        return response.status, payload, {k.lower(): v for k, v in response.getheaders()}


def _zip(files: dict) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name == "exec" else 0o644) << 16
            archive.writestr(info, content)
    return base64.b64encode(buffer.getvalue()).decode()


# What the stock runtime's -compile step makes of a zip (Note [Prebuilt ActionLoop zips],
# shim/extractor.py): ``exec`` runs ``exec__.py``, a launcher importing NAME from
# ``main__.py``. This launcher is our own, minimal, so the zip also runs on the stock proxy.
BUILD_EXEC = '#!/bin/bash\ncd "$(dirname "$0")"\nexec python3 exec__.py "$@"\n'
BUILD_LAUNCHER = """import json, os, sys
from main__ import {entry} as main
out = os.fdopen(3, "wb")
if "__OW_WAIT_FOR_ACK" in os.environ:          # the proxy waits for this line
    out.write(b'{{"ok": true}}\\n')
    out.flush()
for line in sys.stdin:
    args = json.loads(line)
    for key, value in args.items():
        if key != "value":
            name = "__OW_" + key.upper()
            os.environ[name] = value if isinstance(value, str) else json.dumps(value)
    try:
        result = main(args.get("value", {{}}))
    except Exception as exc:
        result = {{"error": str(exc)}}
    sys.stdout.flush()
    sys.stderr.flush()
    out.write(json.dumps(result, ensure_ascii=False).encode() + b"\\n")
    out.flush()
"""
BUILD_ACTION = '''
def main(args):
    return {"entry": "main", "args": args}

def naim(args):
    return {"entry": "naim", "args": args}
'''


def prebuilt_zip(entry: str = "main", without: tuple = ()) -> str:
    """A -compile build of BUILD_ACTION whose entry point is ``entry``, base64, leaving out
    the files named in ``without``."""
    files = {"exec": BUILD_EXEC, "exec__.py": BUILD_LAUNCHER.format(entry=entry), "main__.py": BUILD_ACTION}
    return _zip({name: text for name, text in files.items() if name not in without})


# Non-string init env values reach the action as the Go proxy's json.Marshal writes them:
# compact, keys sorted, HTML characters and U+2028/U+2029 escaped, whole numbers without a fraction.
INIT_ENV = {"FT_OBJECT": {"b": [1, 2.5], "a": "<&>\u2028\u2029é"}, "FT_NUMBER": 1.0, "FT_TEXT": "as is"}
INIT_ENV_SEEN = {"FT_OBJECT": '{"a":"\\u003c\\u0026\\u003e\\u2028\\u2029é","b":[1,2.5]}', "FT_NUMBER": "1", "FT_TEXT": "as is"}


def _init(code, binary=False, main="main", env=None):
    return {"value": {"name": "conformance", "main": main, "code": code, "binary": binary, "env": env or {}}}


def _error(text: str) -> bytes:
    return json.dumps({"error": text}, separators=(",", ":")).encode() + b"\n"


def checks():
    """(name, request path, body, expected status, body check) in the order they must run."""
    exact = lambda expected: (lambda body: body == expected)
    prefix = lambda start: (lambda body: body.startswith(start))
    text = "❄ ☃ ❄" * 200_000
    return [
        ("run before init", "/run", {"value": {}}, 500, exact(_error("no action defined yet"))),
        ("init body not JSON", "/init", b"{not json", 400, prefix(b'{"error":"Error unmarshaling request: ')),
        ("init without code", "/init", {"value": {}}, 403, exact(_error("Missing main/no code to execute."))),
        ("init bad base64", "/init", _init("!!!", binary=True), 400, prefix(b'{"error":"cannot decode the request: ')),
        ("zip without __main__.py", "/init", _init(_zip({"a.py": "x = 1"}), binary=True), 502,
         exact(_error("The action failed to generate or locate a binary. See logs for details."))),
        ("code that does not compile", "/init", _init("def main(args) return"), 502,
         exact(_error("The action failed to generate or locate a binary. See logs for details."))),
        ("import that fails", "/init", _init("import iamnotsupported\ndef main(a):\n    return a\n"), 502,
         exact(_error("Cannot start action. Check logs for details."))),
        ("prebuilt zip without main__.py", "/init", _init(prebuilt_zip(without=("main__.py",)), binary=True),
         502, exact(_error("Cannot start action. Check logs for details."))),
        ("zip with an invalid virtualenv", "/init",
         _init(_zip({"__main__.py": "def main(a):\n    return a\n", "virtualenv/README.md": "no activate_this"}),
               binary=True), 502,
         exact(_error("The action failed to generate or locate a binary. See logs for details."))),
        ("init", "/init", _init(TEST_ACTION, env=INIT_ENV), 200, lambda body: json.loads(body) == {"ok": True}),
        ("second init", "/init", _init(TEST_ACTION), 403,
         exact(_error("Cannot initialize the action more than once."))),
        ("run without value", "/run", {}, 200, lambda body: json.loads(body) == {}),
        ("dict result", "/run", {"value": {"a": 1}}, 200, lambda body: json.loads(body) == {"a": 1}),
        ("list result", "/run", {"value": {"kind": "list"}}, 200, lambda body: json.loads(body) == [1, 2]),
        ("error passthrough", "/run", {"value": {"kind": "error"}}, 200,
         lambda body: json.loads(body) == {"error": "sorry"}),
        ("exception", "/run", {"value": {"kind": "raise"}}, 200,
         lambda body: json.loads(body) == {"error": "conformance exception"}),
        ("non-dict result", "/run", {"value": {"kind": "string"}}, 502,
         exact(_error("The action did not return a dictionary or array."))),
        ("None result", "/run", {"value": {"kind": "none"}}, 200, lambda body: body.strip() == b"null"),
        ("init env values", "/run", {"value": {"kind": "init env"}}, 200,
         lambda body: json.loads(body) == INIT_ENV_SEEN),
        ("__OW_ environment", "/run", {"value": {"kind": "env"}, "namespace": "ns", "action_name": "/ns/a",
                                       "activation_id": "id1", "transaction_id": "t1",
                                       "deadline": "1700000000000"}, 200,
         lambda body: json.loads(body) == {"__OW_NAMESPACE": "ns", "__OW_ACTION_NAME": "/ns/a",
                                           "__OW_ACTIVATION_ID": "id1", "__OW_TRANSACTION_ID": "t1",
                                           "__OW_DEADLINE": "1700000000000"}),
        ("1 MB unicode round trip", "/run", {"value": {"text": text[:1_048_561]}}, 200,
         lambda body: json.loads(body) == {"text": text[:1_048_561]}),
        ("action exits during run", "/run", {"value": {"kind": "exit"}}, 400, exact(_error("command exited"))),
        ("run after the action exited", "/run", {"value": {}}, 500, exact(_error("no action defined yet"))),
    ]


# Answers that differ from stock on purpose (docs/runtime.md), reported as DIFF, not FAIL:
# check name → (status, body check, why).
DELIBERATE = {
    "run after the action exited": (
        200, lambda body: json.loads(body) == {},
        "the runtime replaced the process that exited (FaaSTube with concurrent activations: "
        "Note [A crashed process is replaced])"),
}


def prebuilt_checks():
    """Checks for a second fresh runtime: a prebuilt zip initialises and runs its build's own
    entry point, whatever /init's ``main`` says (the stock proxy runs a build as it is)."""
    return [
        ("prebuilt zip: init ignores main", "/init", _init(prebuilt_zip(), binary=True, main="naim"), 200,
         lambda body: json.loads(body) == {"ok": True}),
        ("prebuilt zip: run calls the build's entry point", "/run", {"value": {"n": 1}}, 200,
         lambda body: json.loads(body) == {"entry": "main", "args": {"n": 1}}),
    ]


def run_conformance(url: str, stdout_log=None, stderr_log=None, timeout: float = 60.0,
                    out=sys.stdout, prebuilt_url: str | None = None) -> int:
    failures = 0

    def report(name, ok, detail=""):
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'  — ' + detail if detail and not ok else ''}", file=out)

    def run(endpoint_url, cases):
        endpoint = Endpoint(endpoint_url, timeout)
        for name, path, body, status, check in cases:
            try:
                got_status, got_body, headers = endpoint.post(path, body)
            except OSError as exc:
                report(name, False, f"no answer from {endpoint_url}: {exc}")
                continue
            whole = headers.get("content-length") == str(len(got_body))
            ok = got_status == status and check(got_body) and whole
            other = DELIBERATE.get(name)
            if not ok and other and whole and got_status == other[0] and other[1](got_body):
                print(f"DIFF  {name}  — {other[2]}", file=out)
                continue
            report(name, ok, f"got {got_status} {got_body[:160]!r}, Content-Length "
                             f"{headers.get('content-length')}; expected {status}")

    run(url, checks())
    if stdout_log and stderr_log:
        time.sleep(0.2)                   # let the runtime's log writes land
        logs = [open(p, encoding="utf-8", errors="replace").read() for p in (stdout_log, stderr_log)]
        report("sentinel after every run, on stdout and stderr",
               all(log.count(SENTINEL) >= 10 for log in logs), f"counts {[l.count(SENTINEL) for l in logs]}")
        report("action output comes before its sentinel",
               f"conformance stdout\n{SENTINEL}" in logs[0] and f"conformance stderr\n{SENTINEL}" in logs[1])
        report("a traceback on stderr for an exception", "ValueError: conformance exception" in logs[1])
        report("second init logged on stdout and stderr",
               all("Cannot initialize the action more than once." in log for log in logs))
    else:
        print("SKIP  log checks (sentinels, output order, tracebacks): pass --stdout and --stderr "
              "with the runtime's log files", file=out)
    if prebuilt_url:
        run(prebuilt_url, prebuilt_checks())
    else:
        print("SKIP  prebuilt zip checks (a runtime initialises once): pass --prebuilt with the "
              "URL of a second fresh runtime", file=out)
    print("NOTE  not checked, and different on the FaaSTube runtime on purpose (docs/runtime.md): the "
          "container's environment reaches the action; concurrent activations work, and a process "
          "that exits is replaced; a prebuilt zip runs through its launcher, so an exec that is not "
          "a Python build is refused", file=out)
    print(f"{'all checks passed' if not failures else f'{failures} checks failed'} against {url}", file=out)
    return 1 if failures else 0
