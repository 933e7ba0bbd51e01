#!/usr/bin/env python3
"""A fake OpenAI-compatible provider for image/boot-test, on loopback only.

Answers POST .../chat/completions as Groq and OpenAI do (status, JSON body, usage,
x-ratelimit-* headers) with "echo: <the last user message>", refuses a wrong key with
OpenAI's 401 body, and appends one JSON line per request to --log, so the test can
count what keyrelay sent. Writes the port it listens on to --port-file.
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key", required=True, help="the API key keyrelay must send")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            key_ok = self.headers.get("authorization") == f"Bearer {args.key}"
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            with lock, open(args.log, "a", encoding="utf-8") as log:
                log.write(json.dumps({"path": self.path, "key_ok": key_ok, "body": body}) + "\n")
            if not self.path.endswith("/chat/completions"):
                self.reply(404, {"error": {"message": "Unknown request URL", "type": "invalid_request_error"}})
                return
            if not key_ok:
                self.reply(401, {"error": {"message": "Invalid API Key", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return
            if not isinstance(body, dict) or not body.get("messages"):
                self.reply(400, {"error": {"message": "'messages' is required", "type": "invalid_request_error"}})
                return
            prompt = next((m.get("content", "") for m in reversed(body["messages"]) if m.get("role") == "user"), "")
            answer = f"echo: {prompt}"
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"]) + 3
            completion_tokens = len(answer.split())
            self.reply(200, {
                "id": f"chatcmpl-boot-{int(time.time() * 1000)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }, {
                "x-ratelimit-limit-requests": "1000",
                "x-ratelimit-remaining-requests": "999",
                "x-ratelimit-reset-requests": "1m26.4s",
                "x-ratelimit-limit-tokens": "100000",
                "x-ratelimit-remaining-tokens": str(100000 - prompt_tokens - completion_tokens),
                "x-ratelimit-reset-tokens": "7.66s",
            })

        def log_message(self, format: str, *a: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(args.port_file, "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
