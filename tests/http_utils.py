"""A local HTTP server for the tests of doe_kernels.vllm's HTTP client."""
import contextlib
import http.server
import json
import threading


@contextlib.contextmanager
def answering(reply):
    """Yields (url, posts): a server on a free localhost port that answers every POST, and keeps
    each request's JSON body in `posts`. `reply`: the body of every answer (bytes, status 200),
    or a function of the request's JSON body giving (status, JSON-able body, headers)."""
    posts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            post = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posts.append(post)
            status, raw, headers = ((200, reply, {}) if isinstance(reply, bytes) else
                                    _encoded(*reply(post)))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posts
    finally:
        server.shutdown()
        server.server_close()


def _encoded(status: int, body, headers: dict) -> tuple:
    return status, json.dumps(body).encode(), headers
