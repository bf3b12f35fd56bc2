"""Start a real ComfyUI with this pack loaded, and talk to it (helper for ``test_comfyui_integration.py``).

Everything the server writes goes to a temp folder: the pack is loaded from a temp parent folder (a symlink
``comfyui-finetune`` -> the repo root, via the ``custom_nodes`` key of an ``extra_model_paths.yaml``), and the base,
output, input, temp and user folders, the sqlite database and the model folders (checkpoints, loras, embeddings,
diffusers) all live under that folder. The server listens on 127.0.0.1 only.

Stdlib only: prompts are followed over ComfyUI's websocket (with the small RFC 6455 client below), or by polling
``/history``. :class:`EventSession` keeps one websocket open across prompts and
records every event, including this pack's ``comfy_finetune.*`` ones (which carry no ``prompt_id``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "comfyui-finetune"
MODEL_KEYS = ("checkpoints", "loras", "embeddings", "diffusers")
# a ceiling, not a duration: ComfyUI starts in 5-15 s alone, but took 80-120 s on 2 cores shared with 4 busy processes
STARTUP_TIMEOUT_S = float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "300"))


# ---------------------------------------------------------------------------------------------- locating things
def comfyui_dir_from_env() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    return Path(value).expanduser().resolve() if value else None


def comfyui_python(comfyui_dir: Path) -> str:
    """The python that runs ComfyUI: $COMFYUI_PYTHON, else <COMFYUI_DIR>/../venv/bin/python, else this one."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for candidate in (comfyui_dir.parent / "venv" / "bin" / "python",
                      comfyui_dir.parent / "venv" / "Scripts" / "python.exe"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supported_flags(comfyui_dir: Path) -> set[str]:
    """The ``--flags`` ComfyUI's ``comfy/cli_args.py`` declares (so we only pass ones this version knows)."""
    try:
        text = (comfyui_dir / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    except OSError:
        return set()
    flags = set()
    for chunk in text.split('add_argument("')[1:]:
        flags.add(chunk.split('"', 1)[0])
    return flags


# ---------------------------------------------------------------------------------------------- node defs
def node_defs_from_object_info(object_info: Mapping[str, Any]) -> dict[str, dict]:
    """``class_type -> {"required": {...}, "optional": {...}}`` in the shape ``INPUT_TYPES()`` returns.

    ``/object_info`` sends V1 combos as ``[[choices...], {opts}]`` and V3 ones as ``["COMBO", {"options": [...]}]``;
    the latter is turned into the former so the converter sees one shape.
    """
    defs: dict[str, dict] = {}
    for class_type, info in object_info.items():
        inputs = (info or {}).get("input") or {}
        out: dict[str, dict] = {}
        for section in ("required", "optional"):
            specs: dict[str, Any] = {}
            for name, spec in (inputs.get(section) or {}).items():
                if isinstance(spec, list) and spec and spec[0] == "COMBO":
                    opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
                    spec = [list(opts.get("options") or []), opts]
                specs[name] = spec
            out[section] = specs
        defs[class_type] = out
    return defs


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted" | "timeout"
    error: dict | None = None  # the execution_error payload
    history: dict = field(default_factory=dict)  # /history/<id>[<id>]
    events: list = field(default_factory=list)  # (type, data) seen on the websocket (empty when polling)
    seconds: float = 0.0


class ServerError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- websocket
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketClient:
    """Just enough of an RFC 6455 client to read ComfyUI's websocket: text and binary messages (fragmented or not),
    pings answered, close noticed. Client frames are masked as the RFC requires. No extensions, no TLS."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode("ascii"))
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._buf:
            self._fill(deadline)
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()).decode("ascii")
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            self.sock.close()
            raise ServerError(f"websocket handshake refused: {lines[0]!r}")

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no websocket data in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError as exc:
            raise TimeoutError("no websocket data in time") from exc
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        self._buf += chunk

    def _frame(self) -> tuple[bool, int, bytes] | None:
        """The next whole frame from the buffer (consumed), or None if it is not all here yet."""
        b = self._buf
        if len(b) < 2:
            return None
        fin, op, masked, n, i = bool(b[0] & 0x80), b[0] & 0x0F, bool(b[1] & 0x80), b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack(">Q", b[2:10])[0], 10
        mask = b""
        if masked:
            if len(b) < i + 4:
                return None
            mask, i = b[i:i + 4], i + 4
        if len(b) < i + n:
            return None
        payload, self._buf = b[i:i + n], b[i + n:]
        if masked:
            payload = bytes(c ^ mask[j % 4] for j, c in enumerate(payload))
        return fin, op, payload

    def _send(self, op: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | op, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | op, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | op, 0x80 | 127, n)
        self.sock.sendall(head + mask + bytes(c ^ mask[j % 4] for j, c in enumerate(payload)))

    def recv(self, timeout: float) -> str | bytes:
        """The next message (str for text, bytes for binary); TimeoutError if none within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        kind = None
        while True:
            frame = self._frame()
            if frame is None:
                self._fill(deadline)
                continue
            fin, op, payload = frame
            if op == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if op == 0xA:  # pong
                continue
            if op == 0x8:
                raise ConnectionError("the server closed the websocket")
            if op in (0x1, 0x2):
                kind, parts = op, [payload]
            else:  # continuation
                parts.append(payload)
            if fin:
                data = b"".join(parts)
                return data.decode("utf-8") if kind == 0x1 else data

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


class EventSession:
    """One websocket client of the server: queue prompts under its client id and read every event it gets.

    ``events`` holds every JSON message received, in order, as ``(type, data, prompt_id)`` where ``prompt_id`` is
    the data's own, or - for messages without one, like this pack's ``comfy_finetune.*`` events - the prompt that
    was executing when it arrived (from ``execution_start``). Binary messages (previews) are counted, not kept.
    """

    def __init__(self, server: ComfyServer, client_id: str | None = None) -> None:
        self.server = server
        self.client_id = client_id or uuid.uuid4().hex
        self.ws = WebSocketClient("127.0.0.1", server.port, f"/ws?clientId={self.client_id}")
        self.events: list[tuple[str, dict, str | None]] = []
        self.binary_messages = 0
        self._running: str | None = None
        self._finished: set[str] = set()

    def __enter__(self) -> EventSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.ws.close()

    def queue(self, prompt: Mapping[str, Any]) -> str:
        return self.server.queue_prompt(prompt, self.client_id)

    def _read_one(self, deadline: float) -> tuple[str, dict, str | None] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            msg = self.ws.recv(left)
        except TimeoutError:
            return None
        if not isinstance(msg, str):
            self.binary_messages += 1
            return self._read_one(deadline)
        event = json.loads(msg)
        etype, data = event.get("type"), event.get("data")
        data = data if isinstance(data, dict) else {}
        pid = data.get("prompt_id")
        if etype == "execution_start":
            self._running = pid
        if etype in ("execution_success", "execution_error", "execution_interrupted") or (
                etype == "executing" and data.get("node") is None and pid is not None):
            self._finished.add(pid)
            if self._running == pid:
                self._running = None
        item = (str(etype), data, pid if pid is not None else self._running)
        self.events.append(item)
        return item

    def wait_for(self, predicate, timeout: float, what: str) -> tuple[str, dict, str | None]:
        """Read events until ``predicate(type, data)`` holds for one (returned); ServerError after ``timeout`` s."""
        for etype, data, pid in self.events:  # already received?
            if predicate(etype, data):
                return etype, data, pid
        deadline = time.monotonic() + timeout
        while True:
            item = self._read_one(deadline)
            if item is None:
                raise ServerError(f"no {what} within {timeout:.0f} s; events: {[e[0] for e in self.events][-30:]}")
            if predicate(item[0], item[1]):
                return item

    def events_of(self, prompt_id: str) -> list[tuple[str, dict]]:
        return [(t, d) for t, d, pid in self.events if pid == prompt_id]

    def follow(self, prompt_id: str, timeout: float) -> PromptResult:
        """Wait until ``prompt_id`` ends; its result with the events that belong to it and its history entry."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while prompt_id not in self._finished and self._read_one(deadline) is not None:
            pass
        result = PromptResult(prompt_id, "timeout", events=self.events_of(prompt_id))
        for etype, data in result.events:
            if etype == "execution_success" or (etype == "executing" and data.get("node") is None
                                                 and result.status == "timeout"):
                result.status = "success"
            elif etype == "execution_error":
                result.status, result.error = "error", data
            elif etype == "execution_interrupted":
                result.status = "interrupted"
        # the websocket event can arrive a moment before the history entry is written
        end = time.monotonic() + 10
        while True:
            result.history = self.server.history(prompt_id)
            if (result.history.get("status") or {}).get("completed") is not None or time.monotonic() > end:
                break
            time.sleep(0.1)
        result.seconds = time.monotonic() - t0
        return result


# ---------------------------------------------------------------------------------------------- the server
class ComfyServer:
    def __init__(self, comfyui_dir: Path, workdir: Path, *, python: str | None = None, port: int | None = None,
                 repo_root: Path = REPO_ROOT) -> None:
        self.comfyui_dir = Path(comfyui_dir)
        self.workdir = Path(workdir)
        self.python = python or comfyui_python(self.comfyui_dir)
        self.port = port or free_port()
        self.repo_root = Path(repo_root)
        self.base_dir = self.workdir / "base"
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.temp_parent = self.workdir / "tmp"
        self.user_dir = self.workdir / "user"
        self.models_dir = self.workdir / "models"
        self.packs_dir = self.workdir / "packs"
        self.cache_dir = self.workdir / "finetune-cache"
        self.yaml_path = self.workdir / "extra_model_paths.yaml"
        self.log_path = self.workdir / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pack_dir(self) -> Path:
        return self.packs_dir / PACK_FOLDER_NAME

    # -------------------------------------------------------------------------------------- setup
    def _prepare(self) -> None:
        # ComfyUI's prestartup scan lists <base>/custom_nodes and crashes if it is missing
        for d in (self.base_dir / "custom_nodes", self.output_dir, self.input_dir, self.temp_parent, self.user_dir,
                  self.packs_dir, self.cache_dir, *(self.models_dir / k for k in MODEL_KEYS)):
            d.mkdir(parents=True, exist_ok=True)
        if not self.pack_dir.exists():
            try:
                self.pack_dir.symlink_to(self.repo_root, target_is_directory=True)
            except OSError:  # no symlinks (e.g. Windows without privileges): copy the sources
                shutil.copytree(self.repo_root, self.pack_dir,
                                ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".ci", "tests"))
        lines = ["comfyui_finetune_integration_test:",
                 f"  base_path: {json.dumps(str(self.workdir))}",
                 "  is_default: true",
                 "  custom_nodes: packs"]
        lines += [f"  {key}: models/{key}" for key in MODEL_KEYS]
        self.yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self) -> list[str]:
        flags = supported_flags(self.comfyui_dir)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(self.yaml_path)]
        optional = {
            "--base-directory": str(self.base_dir),
            "--output-directory": str(self.output_dir),
            "--input-directory": str(self.input_dir),
            "--temp-directory": str(self.temp_parent),  # ComfyUI appends "temp"
            "--user-directory": str(self.user_dir),
            "--database-url": f"sqlite:///{self.user_dir / 'comfyui.db'}",
        }
        for flag, value in optional.items():
            if not flags or flag in flags:
                cmd += [flag, value]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("COMFYUI_DIR", None)
        env.update({
            "COMFY_FINETUNE_CACHE": str(self.cache_dir),
            "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the ComfyUI checkout or the repo
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
        })
        for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):  # the test venv must not leak into ComfyUI's
            env.pop(key, None)
        return env

    # -------------------------------------------------------------------------------------- life cycle
    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> ComfyServer:
        self._prepare()
        self._log_file = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_dir), env=self.env(),
                                     stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} during startup "
                                  f"(command: {' '.join(self.command())}).\n--- log tail ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s.\n"
                                  f"--- log tail ---\n{self.log_tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -------------------------------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_raw(self, path: str, timeout: float = 30.0) -> tuple[int, bytes, dict[str, str]]:
        """GET ``path``: HTTP status, body and headers (errors included, not raised)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers.items())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers.items())

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        status, raw = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body, timeout=timeout)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    # -------------------------------------------------------------------------------------- prompts
    def queue_prompt(self, prompt: Mapping[str, Any], client_id: str) -> str:
        status, reply = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200 or not isinstance(reply, dict) or "prompt_id" not in reply:
            raise ServerError(f"POST /prompt was refused (HTTP {status}): {json.dumps(reply, indent=1)[:4000]}")
        if reply.get("node_errors"):
            raise ServerError(f"POST /prompt reported node errors: {json.dumps(reply['node_errors'], indent=1)}")
        return str(reply["prompt_id"])

    def history(self, prompt_id: str) -> dict:
        return (self.get_json(f"/history/{prompt_id}") or {}).get(prompt_id) or {}

    def run_prompt(self, prompt: Mapping[str, Any], timeout: float = 120.0,
                   use_websocket: bool = True) -> PromptResult:
        """Queue ``prompt`` and wait until it finishes: over the websocket, or by polling /history."""
        t0 = time.monotonic()
        if use_websocket:
            with self.session() as session:
                result = session.follow(session.queue(prompt), timeout)
        else:
            result = self._run_poll(prompt, uuid.uuid4().hex, timeout)
        result.seconds = time.monotonic() - t0
        return result

    def session(self) -> EventSession:
        """A websocket client of this server (use as a context manager); see :class:`EventSession`."""
        return EventSession(self)

    def interrupt(self, prompt_id: str | None = None) -> int:
        """POST /interrupt (only ``prompt_id`` when given, as the frontend's cancel button does); the HTTP status."""
        status, _ = self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status

    # -------------------------------------------------------------------------------------- process memory
    def _proc_status(self) -> dict[str, int]:
        if self.proc is None:
            raise ServerError("the server is not running")
        out = {}
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def rss_bytes(self) -> int:
        """The server process's resident memory now (Linux ``/proc/<pid>/status`` VmRSS)."""
        return self._proc_status()["VmRSS"]

    def peak_rss_bytes(self) -> int:
        """The highest resident memory since start or the last :meth:`reset_peak_rss` (VmHWM)."""
        return self._proc_status()["VmHWM"]

    def reset_peak_rss(self) -> None:
        """Reset VmHWM to the current RSS (``echo 5 > /proc/<pid>/clear_refs``; Linux 4.0+, same user)."""
        if self.proc is None:
            raise ServerError("the server is not running")
        with open(f"/proc/{self.proc.pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")

    def _run_poll(self, prompt: Mapping[str, Any], client_id: str, timeout: float) -> PromptResult:
        prompt_id = self.queue_prompt(prompt, client_id)
        result = PromptResult(prompt_id, "timeout")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            status = entry.get("status") or {}
            if entry and status.get("completed") is not None:
                result.history = entry
                messages = [(m[0], m[1]) for m in status.get("messages") or [] if isinstance(m, list) and len(m) == 2]
                result.events = messages
                for etype, data in messages:
                    if etype == "execution_error":
                        result.status, result.error = "error", data
                    elif etype == "execution_interrupted" and result.status != "error":
                        result.status = "interrupted"
                if result.status == "timeout":
                    result.status = "success" if status.get("status_str") == "success" else "error"
                return result
            time.sleep(0.2)
        return result

    def saved_images(self, prompt: Mapping[str, Any], result: PromptResult) -> dict[str, list[Path]]:
        """``node id -> [paths]`` of the images every SaveImage node in ``prompt`` reported in the history."""
        outputs = result.history.get("outputs") or {}
        saved: dict[str, list[Path]] = {}
        for nid, node in prompt.items():
            if node.get("class_type") != "SaveImage":
                continue
            images = (outputs.get(str(nid)) or {}).get("images") or []
            paths = []
            for img in images:
                base = {"output": self.output_dir, "temp": self.temp_parent / "temp",
                        "input": self.input_dir}.get(img.get("type", "output"), self.output_dir)
                paths.append(base / (img.get("subfolder") or "") / img["filename"])
            saved[str(nid)] = paths
        return saved


# ---------------------------------------------------------------------------------------------- in-process checks
_IN_COMFYUI_BOOTSTRAP = r'''
import json, os, sys
comfyui_dir, pack_parent, work, script_path = sys.argv[1:5]
sys.argv = [sys.argv[0]]
sys.path[:0] = [pack_parent, comfyui_dir]
os.chdir(comfyui_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
import folder_paths
import comfy.model_management
for key in ("checkpoints", "loras", "embeddings", "diffusers"):
    path = os.path.join(work, "models", key)
    os.makedirs(path, exist_ok=True)
    folder_paths.add_model_folder_path(key, path, is_default=True)
for name in ("output", "input", "temp"):
    os.makedirs(os.path.join(work, name), exist_ok=True)
folder_paths.set_output_directory(os.path.join(work, "output"))
folder_paths.set_input_directory(os.path.join(work, "input"))
folder_paths.set_temp_directory(os.path.join(work, "temp"))
with open(script_path, encoding="utf-8") as f:
    code = compile(f.read(), script_path, "exec")
scope = {"__name__": "__main__", "WORK": work}
exec(code, scope)
print("RESULT " + json.dumps(scope.get("RESULT", {})), flush=True)
'''


def run_in_comfyui(comfyui_dir: Path, workdir: Path, script: str, *, python: str | None = None,
                   repo_root: Path = REPO_ROOT, timeout: float = 600.0) -> dict:
    """Run ``script`` in ComfyUI's python with ComfyUI's modules imported (``--cpu``), no server.

    The pack is importable as ``comfy_finetune`` (a symlink in ``workdir``) and ``host.in_comfyui()`` is true, so
    host functions take their ComfyUI paths. Model, output, input and temp folders live under ``workdir``; nothing
    is written into the checkout. The script sees ``WORK`` (the folder) and sets ``RESULT`` (JSON-able), which is
    returned. Raises :class:`ServerError` with the output tail if the script fails.
    """
    comfyui_dir, workdir = Path(comfyui_dir), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pack_parent = workdir / "pack"
    pack_parent.mkdir(exist_ok=True)
    link = pack_parent / "comfy_finetune"
    if not link.exists():
        try:
            link.symlink_to(Path(repo_root), target_is_directory=True)
        except OSError:
            shutil.copytree(repo_root, link, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info"))
    boot = workdir / "bootstrap.py"
    boot.write_text(_IN_COMFYUI_BOOTSTRAP, encoding="utf-8")
    script_path = workdir / "script.py"
    script_path.write_text(script, encoding="utf-8")
    env = dict(os.environ)
    env.pop("COMFYUI_DIR", None)
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(key, None)
    env.update({"COMFY_FINETUNE_CACHE": str(workdir / "finetune-cache"), "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"})
    cmd = [python or comfyui_python(comfyui_dir), str(boot), str(comfyui_dir), str(pack_parent), str(workdir),
           str(script_path)]
    try:
        proc = subprocess.run(cmd, cwd=str(comfyui_dir), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"the in-ComfyUI script did not finish within {timeout:.0f} s") from exc
    output = (proc.stdout or "") + (proc.stderr or "")
    lines = [line for line in (proc.stdout or "").splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(output.splitlines()[-60:])
        raise ServerError(f"the in-ComfyUI script failed (exit {proc.returncode}).\n--- output tail ---\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])
