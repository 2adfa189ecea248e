"""``python -m aiplane_example_http.server NAME ADAPTER_FILE PORT_FILE``: answer OpenAI completions for NAME.

Binds a free port on loopback and writes it to PORT_FILE once listening. Each answer says which adapter
(the digest in ADAPTER_FILE, read per request) produced it.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main(name: str, adapter_file: str, port_file: str) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path != "/v1/completions" or body.get("model") != name:
                return self._send(404, {"error": {"message": f"no model {body.get('model')!r} at {self.path}"}})
            adapter = Path(adapter_file).read_text().strip()
            text = f" {str(body.get('prompt', ''))[:16]} (adapter {adapter[:19]})"
            self._send(200, {"object": "text_completion", "model": name, "choices": [{"index": 0, "text": text}]})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # Listening already (the constructor binds and listens); renamed into place so no reader sees half a number.
    Path(port_file + ".tmp").write_text(str(server.server_address[1]))
    Path(port_file + ".tmp").rename(port_file)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
