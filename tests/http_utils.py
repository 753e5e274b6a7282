"""A local HTTP server for the tests of doe_kernels.vllm's HTTP client: one body for every POST."""
import contextlib
import http.server
import json
import threading


@contextlib.contextmanager
def answering(body: bytes):
    """Yields (url, posts): a server on a free localhost port that answers every POST with `body`
    (status 200) and keeps each request's JSON body in `posts`."""
    posts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posts
    finally:
        server.shutdown()
        server.server_close()
