"""A static HTTP server for a shard directory, run in a thread, with injectable faults (tests, bench_loader --url).

    srv = ShardServer(dir).start()      # srv.url -> "http://127.0.0.1:PORT"
    srv.cut["train-000001.tar"] = (4096, 1)       # next 1 response of that file stops after 4096 bytes
    srv.cut["train-000001.tar"] = (4096, None)    # every response does (a shard that never reads whole)
    srv.restart_after_cut = 0.5         # a cut also stops the whole server, which comes back 0.5 s later
"""
from __future__ import annotations

import functools
import http.server
import threading
import time
from typing import Optional


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def copyfile(self, source, outputfile) -> None:
        owner: ShardServer = self.server.owner
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        after = owner._take_cut(name)
        if after is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(after))  # Content-Length announced the whole file: the client sees a break
        outputfile.flush()
        self.close_connection = True
        if owner.restart_after_cut is not None:
            threading.Thread(target=owner._bounce, daemon=True).start()


class ShardServer:
    def __init__(self, root: str, port: int = 0):
        self.root, self.port = str(root), port
        self.cut: dict[str, tuple[int, Optional[int]]] = {}
        self.hits: dict[str, int] = {}
        self.restart_after_cut: Optional[float] = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ShardServer":
        handler = functools.partial(_Handler, directory=self.root)
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _bounce(self) -> None:
        """The server dies (connections refused) and comes back on the same port."""
        with self._lock:
            self.stop()
            time.sleep(self.restart_after_cut)
            self.start()
            self.restarts += 1

    def _take_cut(self, name: str) -> Optional[int]:
        with self._lock:
            self.hits[name] = self.hits.get(name, 0) + 1
            if name not in self.cut:
                return None
            after, times = self.cut[name]
            if times is not None:
                if times <= 1:
                    del self.cut[name]
                else:
                    self.cut[name] = (after, times - 1)
            return after

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
