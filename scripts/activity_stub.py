#!/usr/bin/env python3
"""A Step Functions activity endpoint for scripts/test-images: it speaks the activity API's
JSON 1.0 protocol (GetActivityTask, SendTaskHeartbeat, SendTaskSuccess, SendTaskFailure) as the
service does, hands out the task documents it was given, one per poll, and writes what the
worker reported to a JSON file once every task has an answer.

    activity_stub.py --port-file F --results R --activity-arn ARN TASK.json [TASK.json ...]

Long polls with nothing to hand out wait 1 s, then answer {} as the service does after its
60 s. Only the standard library: it runs on the host's python3.
"""
import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--activity-arn", required=True)
    ap.add_argument("tasks", nargs="+")
    args = ap.parse_args()
    lock = threading.Lock()
    queue = [(f"token-{i}", open(path).read()) for i, path in enumerate(args.tasks)]
    answers = {}
    heartbeats = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # A worker stopped (SIGTERM) during its long poll: nobody is listening.
                pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            action = self.headers.get("X-Amz-Target", "").split(".")[-1]
            token = body.get("taskToken", "")
            if action == "GetActivityTask":
                if body.get("activityArn") != args.activity_arn:
                    return self.reply(400, {"__type": "ActivityDoesNotExist",
                                            "message": body.get("activityArn", "")})
                with lock:
                    task = queue.pop(0) if queue else None
                if task is None:
                    time.sleep(1)
                    return self.reply(200, {})
                return self.reply(200, {"taskToken": task[0], "input": task[1]})
            if action == "SendTaskHeartbeat":
                with lock:
                    heartbeats[token] = heartbeats.get(token, 0) + 1
                return self.reply(200, {})
            if action in ("SendTaskSuccess", "SendTaskFailure"):
                with lock:
                    if action == "SendTaskSuccess":
                        answers[token] = {"output": json.loads(body["output"])}
                    else:
                        answers[token] = {"error": body.get("error"), "cause": body.get("cause")}
                    answers[token]["heartbeats"] = heartbeats.get(token, 0)
                    if len(answers) == len(args.tasks):
                        with open(args.results + ".tmp", "w") as f:
                            json.dump(answers, f, indent=1, sort_keys=True)
                        # Renamed into place: a reader never sees half a file.
                        os.replace(args.results + ".tmp", args.results)
                return self.reply(200, {})
            return self.reply(400, {"__type": "UnknownOperationException", "message": action})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(args.port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
