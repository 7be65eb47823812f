"""The action process: ``python -m shim.launcher REQUEST_FD REPLY_FD MAIN [FILE]``, run in the
action's folder. It imports the action (FILE, default ``__main__.py``) once, then answers one
JSON line per activation.

Protocol (one type of message each way, one line each):
- at start, after importing the action: ``{"ok": true}`` on REPLY_FD, or exit non-zero with
  the reason on stderr;
- request: the /run body (``{"value": …, "activation_id": …, …}``) on REQUEST_FD; every key
  but ``value`` becomes ``__OW_<KEY>`` in the environment for the call;
- reply: the result as ``json.dumps(result, ensure_ascii=False)``, as the stock Python
  launcher writes it (the shim passes these bytes through unchanged). An exception becomes
  ``{"error": str(exception)}`` with the traceback on stderr. A result JSON cannot hold is
  ``NOT_JSON`` + why.

A Knative request (shim/knative.py: a CloudEvent, or a plain body) is the same line behind
``KNATIVE``: its ``value`` may come as ``value_base64`` (event data that is bytes) and its
``event`` (the CloudEvent's attributes, or null) is what ``faastube.event()`` returns during
the call. Its reply may also be ``RAISED`` + ``{"error": …}`` (the function raised: Knative
answers 5xx, so Eventing retries) or ``BYTES`` + the base64 of a ``bytes`` result. The /run
bodies of OpenWhisk are checked as JSON by the shim first, so they never start with these
bytes.

stdout and stderr are flushed before each reply, so the shim's activation sentinels always
come after the action's own output. Arrays in a result are put into the FaaSTube pool and
replaced by refs (faastube.results).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import traceback

from faastube.config import ShimConfig

IMPORT_FAILED_EXIT = 86     # "the import failed" (not the action's own sys.exit at import)
LOG_MARKER = ShimConfig.read("log_marker")     # set when the shim captures logs


def end_of_logs() -> None:
    """Flush the action's output; with captured logs, mark where this activation's ends."""
    for stream in (sys.stdout, sys.stderr):
        if LOG_MARKER:
            stream.write(LOG_MARKER)
        stream.flush()


def activate_virtualenv(folder: str) -> None:
    from shim.extractor import INVALID_VIRTUALENV, activate_this
    if not os.path.isdir(os.path.join(folder, "virtualenv")):
        return
    activate = activate_this(folder)
    if activate is None:                    # a prebuilt zip's (Note [Prebuilt ActionLoop zips])
        sys.stderr.write(INVALID_VIRTUALENV + "\n")
        sys.exit(IMPORT_FAILED_EXIT)
    with open(activate) as file:
        exec(compile(file.read(), activate, "exec"), {"__file__": activate})


def load_main(folder: str, name: str, entry: str = "__main__.py"):
    spec = importlib.util.spec_from_file_location("main__", os.path.join(folder, entry))
    module = importlib.util.module_from_spec(spec)
    sys.modules["main__"] = module
    spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise ImportError(f"cannot import name '{name}' from 'main__': the action defines no "
                          f"function {name!r}")
    return function


def serve(main, requests, replies, lifetime=None) -> None:
    from faastube.results import publish_arrays
    from faastube.sdk import activation, handling_event
    for line in requests:
        knative = line.startswith(KNATIVE)
        args = json.loads(line[len(KNATIVE):] if knative else line)
        value = args.pop("value", {}) if isinstance(args, dict) else {}
        attributes = None
        if knative:
            attributes = args.pop("event", None)
            if "value_base64" in args:
                value = base64.b64decode(args.pop("value_base64"))
        saved = {}
        for key, item in (args.items() if isinstance(args, dict) else ()):
            variable = f"__OW_{key.upper()}"
            text = item if isinstance(item, str) else json.dumps(item)
            previous = os.environ.get(variable)
            try:
                os.environ[variable] = text
            except (ValueError, UnicodeError, OSError):
                # A name with "=" or NUL, or text the OS cannot hold: that one field is left
                # out; the activation runs (a bad request must not end the action's process).
                print(f"faastube: request field {key!r} cannot be an environment variable; left out",
                      file=sys.stderr)
                continue
            saved.setdefault(variable, previous)
        raised = False
        try:
            with activation(os.environ.get("__OW_ACTIVATION_ID") or None,
                            os.environ.get("__OW_ACTION_NAME") or None, lifetime), \
                    handling_event(attributes):
                result = publish_arrays(main(value))
        except Exception as exc:
            print(traceback.format_exc(), file=sys.stderr)
            result, raised = {"error": str(exc)}, True
        finally:
            for variable, old in saved.items():
                if old is None:
                    os.environ.pop(variable, None)
                else:
                    os.environ[variable] = old
        try:
            if knative and isinstance(result, (bytes, bytearray, memoryview)):
                reply = BYTES + base64.b64encode(result)
            else:
                reply = (RAISED if knative and raised else b"") + json.dumps(
                    result, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except ValueError as exc:
            # NaN or Infinity: Python would write them, but they are not JSON, and the stock
            # proxy answers 502 to what it cannot parse.
            print(f"the action's result is not JSON: {exc}", file=sys.stderr)
            reply = NOT_JSON + str(exc).encode("utf-8", "replace")
        end_of_logs()
        replies.write(reply + b"\n")
        replies.flush()


NOT_JSON = b"\x00"     # a reply line that starts with it: the result could not be made JSON
KNATIVE = b"\x01"      # a request line that starts with it: a Knative request (module docstring)
BYTES = b"\x01"        # a Knative request's reply: a bytes result, in base64
RAISED = b"\x02"       # a Knative request's reply: the function raised


def main(argv) -> None:
    request_fd, reply_fd, name = int(argv[0]), int(argv[1]), argv[2]
    entry = argv[3] if len(argv) > 3 else "__main__.py"
    folder = os.getcwd()
    sys.path.insert(0, folder)
    activate_virtualenv(folder)
    try:
        from faastube.sdk import result_lifetime
        lifetime = result_lifetime()      # a bad result lifetime setting fails /init, in its words
        function = load_main(folder, name, entry)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        sys.exit(IMPORT_FAILED_EXIT)
    replies = os.fdopen(reply_fd, "wb")
    end_of_logs()
    replies.write(b'{"ok": true}\n')
    replies.flush()
    serve(function, os.fdopen(request_fd, "rb"), replies, lifetime)


if __name__ == "__main__":
    main(sys.argv[1:])
