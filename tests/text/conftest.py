"""A local chat-completions server (http.server on 127.0.0.1 in a thread) with scripted faults."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

GOOD_ANSWER = {
    "facial": "Raised cheeks and a wide smile.",
    "vocal": "A bright voice with rising pitch.",
    "agreement": "Face and voice agree.",
    "emotion": "Happy",
    "intensity": "high",
    "description": "The person is very happy: a wide smile and a bright, rising voice.",
}


@dataclass
class ChatServer:
    """Answers POST /v1/chat/completions. `script` is consumed one entry per request (then "ok"):
    "ok", "fenced" (answer in a ```json fence), "500", "503", "400", "timeout" (sleeps past the client's
    timeout, then answers), "malformed" (prose, no JSON), "echo-key" (a 500 whose body echoes the
    Authorization header)."""

    script: list[str] = field(default_factory=list)
    sleep_s: float = 1.5
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def next_action(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        with self.lock:
            self.requests.append(body)
            self.headers.append(headers)
            return self.script.pop(0) if self.script else "ok"

    @property
    def count(self) -> int:
        return len(self.requests)


def _completion(content: str) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": "test-model",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/v1/chat/completions":
                self._send(404, b'{"error": "not found"}')
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            action = server.next_action(body, dict(self.headers))
            if action == "timeout":
                time.sleep(server.sleep_s)
                action = "ok"
            if action in ("500", "503", "400"):
                self._send(int(action), json.dumps({"error": {"message": f"scripted {action}"}}).encode())
            elif action == "echo-key":
                echo = {"error": {"message": f"bad auth {self.headers.get('Authorization')}"}}
                self._send(500, json.dumps(echo).encode())
            elif action == "malformed":
                self._send(200, _completion("I think the person is happy, probably."))
            elif action == "fenced":
                self._send(200, _completion("Sure!\n```json\n" + json.dumps(GOOD_ANSWER) + "\n```"))
            else:
                self._send(200, _completion(json.dumps(GOOD_ANSWER)))

    return Handler


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    state = ChatServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
