"""A real ComfyUI server (``main.py``) on 127.0.0.1 with this pack installed, for tests.

``running_server(base_dir)`` lays out a ComfyUI base directory (custom_nodes/ with a link to this
repository, models/, input/, output/, user/), starts ``main.py --cpu`` on a free loopback port, waits
until it answers, yields a handle, and always stops the process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from comfy_runtime import REPO, comfyui_root

PACK_DIR_NAME = "tlora-nodes"


@dataclass
class ServerHandle:
    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen

    def get_json(self, route: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, route: str, payload: dict, timeout: float = 30.0):
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base_dir(base_dir: Path, extra_custom_nodes: dict[str, Path] | None = None) -> Path:
    for sub in ("custom_nodes", "models/loras", "input", "output", "user", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    links = {PACK_DIR_NAME: REPO, **(extra_custom_nodes or {})}
    for name, target in links.items():
        link = base_dir / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=target.is_dir())
    return base_dir


@contextlib.contextmanager
def running_server(base_dir: Path, extra_args: list[str] | None = None,
                   extra_custom_nodes: dict[str, Path] | None = None, startup_timeout: float = 120.0):
    prepare_base_dir(base_dir, extra_custom_nodes)
    port = free_port()
    log_path = base_dir / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:",
           "--disable-auto-launch", "--disable-api-nodes", *(extra_args or [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(cmd, cwd=comfyui_root(), stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env)
    handle = ServerHandle(f"http://127.0.0.1:{port}", base_dir, log_path, process)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {process.returncode}:\n{handle.log()[-4000:]}")
            try:
                handle.get_json("/system_stats", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI server not up after {startup_timeout}s:\n{handle.log()[-4000:]}") from None
                time.sleep(0.3)
        yield handle
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
