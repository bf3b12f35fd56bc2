"""Start a real ComfyUI with this pack loaded, and talk to it (helper for ``test_comfyui_integration.py``).

Everything the server writes goes to a temp folder: the pack is loaded from a temp parent folder (a symlink
``comfyui-finetune`` -> the repo root, via the ``custom_nodes`` key of an ``extra_model_paths.yaml``), and the base,
output, input, temp and user folders, the sqlite database and the model folders (checkpoints, loras, embeddings,
diffusers) all live under that folder. The server listens on 127.0.0.1 only.

Stdlib only; ``websocket-client`` is used to follow a prompt when importable, otherwise ``/history`` is polled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

try:  # optional: follow prompts over the websocket when available
    import websocket  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    websocket = None

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "comfyui-finetune"
MODEL_KEYS = ("checkpoints", "loras", "embeddings", "diffusers")
STARTUP_TIMEOUT_S = 120.0


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
        for d in (self.base_dir / "custom_nodes", self.output_dir, self.input_dir, self.temp_parent, self.user_dir, self.packs_dir,
                  self.cache_dir, *(self.models_dir / k for k in MODEL_KEYS)):
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
    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "ComfyServer":
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

    def __enter__(self) -> "ComfyServer":
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
                   use_websocket: bool | None = None) -> PromptResult:
        """Queue ``prompt`` and wait until it finishes: over the websocket if possible, else by polling /history."""
        if use_websocket is None:
            use_websocket = websocket is not None
        client_id = uuid.uuid4().hex
        t0 = time.monotonic()
        if use_websocket:
            result = self._run_ws(prompt, client_id, timeout)
        else:
            result = self._run_poll(prompt, client_id, timeout)
        result.seconds = time.monotonic() - t0
        return result

    def _run_ws(self, prompt: Mapping[str, Any], client_id: str, timeout: float) -> PromptResult:
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=10)
        try:
            prompt_id = self.queue_prompt(prompt, client_id)
            result = PromptResult(prompt_id, "timeout")
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ws.settimeout(left)
                try:
                    msg = ws.recv()
                except websocket.WebSocketTimeoutException:
                    break
                if not isinstance(msg, str):
                    continue  # binary frames: previews, progress text
                event = json.loads(msg)
                etype, data = event.get("type"), event.get("data") or {}
                if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                    continue
                result.events.append((etype, data))
                if etype == "execution_success":
                    result.status = "success"
                    break
                if etype == "execution_error":
                    result.status, result.error = "error", data
                    break
                if etype == "execution_interrupted":
                    result.status = "interrupted"
                    break
                if etype == "executing" and data.get("node") is None:
                    result.status = "success"
                    break
        finally:
            ws.close()
        # the websocket event can arrive a moment before the history entry is written
        end = time.monotonic() + 10
        while True:
            result.history = self.history(prompt_id)
            if (result.history.get("status") or {}).get("completed") is not None or time.monotonic() > end:
                break
            time.sleep(0.1)
        return result

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
