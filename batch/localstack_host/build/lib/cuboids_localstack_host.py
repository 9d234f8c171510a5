"""LocalStack's Lambda service, with functions run as host processes instead of in Docker.

LocalStack runs Lambda functions in containers with an init binary it downloads from GitHub;
no machine here reaches GitHub. This runtime executor (LAMBDA_RUNTIME_EXECUTOR=host) starts the
function's command on the host instead (CUBOIDS_LAMBDA_HOST_COMMAND, e.g. `cuboids lambda`: the
same binary the image runs) and serves it the standard Lambda Runtime API (next invocation,
response, error), so that LocalStack's Lambda API and Step Functions' lambda:invoke run the real
function code. Only for tests: one process per execution environment, as Lambda does.
"""

import json
import os
import queue
import shlex
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from localstack.services.lambda_.invocation.lambda_models import InvocationResult
from localstack.services.lambda_.invocation.plugins import RuntimeExecutorPlugin
from localstack.services.lambda_.invocation.runtime_executor import RuntimeExecutor

BASE = "/2018-06-01/runtime"


class RuntimeApi:
    """The Runtime API on a free loopback port: invocations queued, outcomes by request id."""

    def __init__(self):
        self.pending = queue.Queue()
        self.outcomes = {}
        self.done = threading.Condition()
        self.polled = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def reply(self, status, body=b"{}", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != BASE + "/invocation/next":
                    return self.reply(404)
                api.polled.set()
                request_id, deadline_ms, arn, payload = api.pending.get()
                self.reply(200, payload, [
                    ("Lambda-Runtime-Aws-Request-Id", request_id),
                    ("Lambda-Runtime-Deadline-Ms", str(deadline_ms)),
                    ("Lambda-Runtime-Invoked-Function-Arn", arn),
                ])

            def do_POST(self):
                data = self.body()
                path = self.path[len(BASE):]
                if path == "/init/error":
                    api.finish("init", data, True)
                elif path.startswith("/invocation/"):
                    request_id, what = path[len("/invocation/"):].rsplit("/", 1)
                    api.finish(request_id, data, what == "error")
                else:
                    return self.reply(404)
                self.reply(202)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def finish(self, request_id, data, is_error):
        with self.done:
            self.outcomes[request_id] = (data, is_error)
            self.done.notify_all()

    def invoke(self, request_id, deadline_ms, arn, payload, timeout):
        self.pending.put((request_id, deadline_ms, arn, payload))
        with self.done:
            self.done.wait_for(
                lambda: request_id in self.outcomes or "init" in self.outcomes, timeout)
            if request_id in self.outcomes:
                return self.outcomes.pop(request_id)
            if "init" in self.outcomes:
                return self.outcomes["init"]
        return (json.dumps({"errorType": "Sandbox.Timedout",
                            "errorMessage": f"no answer within {timeout} s"}).encode(), True)


class HostRuntimeExecutor(RuntimeExecutor):
    def __init__(self, id, function_version):
        super().__init__(id, function_version)
        self.api = None
        self.process = None

    def start(self, env_vars):
        self.api = RuntimeApi()
        command = shlex.split(os.environ["CUBOIDS_LAMBDA_HOST_COMMAND"])
        env = dict(os.environ)
        env.update({k: str(v) for k, v in env_vars.items() if v is not None})
        # LocalStack points functions at itself; the function's own settings say where its
        # services are (the test's S3 server), and this process is on the host.
        for key in ("AWS_ENDPOINT_URL", "LOCALSTACK_HOSTNAME"):
            if key not in self.function_version.config.environment:
                env.pop(key, None)
        env["AWS_LAMBDA_RUNTIME_API"] = self.api.address
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not self.api.polled.wait(0.05):
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{command} did not start polling the Runtime API")

    def stop(self):
        if self.process:
            self.process.kill()
            self.process.wait()
        if self.api:
            self.api.server.shutdown()

    def get_address(self):
        return "127.0.0.1"

    def get_endpoint_from_executor(self):
        return "127.0.0.1"

    def get_runtime_endpoint(self):
        return f"http://{self.api.address}" if self.api else ""

    def invoke(self, payload):
        timeout = self.function_version.config.timeout
        deadline_ms = int((time.time() + timeout) * 1000)
        data, is_error = self.api.invoke(
            payload["invoke-id"], deadline_ms, payload.get("invoked-function-arn", ""),
            payload["payload"].encode(), timeout + 5)
        return InvocationResult(payload["invoke-id"], data, is_error=is_error, logs="")

    def get_logs(self):
        return ""

    @classmethod
    def prepare_version(cls, function_version):
        pass

    @classmethod
    def cleanup_version(cls, function_version):
        pass


class HostRuntimeExecutorPlugin(RuntimeExecutorPlugin):
    name = "host"

    def load(self, *args, **kwargs):
        return HostRuntimeExecutor
