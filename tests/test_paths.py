"""Every file name that comes from a workflow stays inside its folder (issue 7, items 1 and 2).

Write sites (FinetuneSaveLoRA/Embedding/Checkpoint ``name``, SaveImage ``filename_prefix``) must refuse a bad name with
an error naming the node and the input, or sanitise it: whatever gets written lies inside the folder, with no odd
character, reserved device name or over-long component in its path, and nothing outside changes. Read sites
(TrainingData ``folder``, LoadBase ``ckpt_name``, AddLoRA ``lora_name``, ``embedding:`` names in prompts, LoadImage
``image``) must refuse: each bad name points at a bait file outside the folders (directly, through ``..``, an absolute
path or a symlink) that would load fine if it were read.

Last, a workflow full of hostile strings (Python, shell and template injections, paths to /etc/passwd) runs with
file access, process creation and a sentinel file watched: no code runs and nothing outside the configured folders
is read or written.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfy_finetune import host
from comfy_finetune.core.embeddings import Embedding
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.lora import LoraModule, LoraWeights, to_kohya_state_dict
from comfy_finetune.headless.runner import node_classes

N = node_classes()
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
ODD_CHARS = set('<>:"|?*\\')


# ============================================================================================== folders and bait
def _png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def _lora(handle) -> LoraWeights:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for path, m in handle.base.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith("to_q"):
            out_f, in_f = m.weight.shape
            mods[("unet", path)] = LoraModule(torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g),
                                              alpha=2.0)
    return LoraWeights(handle.family, mods, {}, "paths")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (links not followed) with (mtime_ns, size)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


class Folders:
    def __init__(self, root: Path, session_models: Path, handles: dict) -> None:
        self.root = root
        self.models, self.input, self.output = root / "models", root / "input", root / "output"
        self.outside = root / "outside"
        for sub in ("checkpoints", "loras", "embeddings", "diffusers"):
            (self.models / sub).mkdir(parents=True)
        self.input.mkdir()
        self.output.mkdir()
        sd1 = handles["sd1"]
        self.pipe = sd1
        self.lora = _lora(sd1)
        width = int(sd1.base.text_encoders[0].config.hidden_size)
        self.embedding = Embedding(name="paths", vectors={"te1": torch.randn(2, width) * 0.01})

        # Bait outside every configured folder: each would load fine if a name could reach it.
        o = self.outside
        _png(o / "escape" / "a.png")
        (o / "escape" / "a.txt").write_text("secret caption")
        _png(o / "a.png")
        _png(o / "escape.png")
        shutil.copytree(session_models / "diffusers" / "tiny-sd1", o / "model")
        sd, meta = to_kohya_state_dict(self.lora, family=sd1.family, unet_config=dict(sd1.base.unet.config))
        save_file(sd, str(o / "escape.safetensors"), metadata=meta)
        save_file({"emb_params": torch.randn(2, width)}, str(o / "emb.safetensors"))
        (o / "victim.safetensors").write_bytes(b"precious, must never change")
        (o / "victim_00001_.png").write_bytes(b"precious, must never change")

        # Links from inside every folder to the bait.
        for folder in (self.input, self.output, *(self.models / k for k in ("checkpoints", "loras", "embeddings",
                                                                              "diffusers"))):
            os.symlink(o, folder / "link", target_is_directory=True)
        os.symlink(o / "escape", self.input / "evil", target_is_directory=True)
        os.symlink(o / "escape.png", self.input / "evil.png")
        os.symlink(o / "escape.safetensors", self.models / "loras" / "evil.safetensors")
        os.symlink(o / "escape.safetensors", self.models / "checkpoints" / "evil.safetensors")
        os.symlink(o / "model", self.models / "diffusers" / "evil", target_is_directory=True)
        os.symlink(o / "emb.safetensors", self.models / "embeddings" / "evil.safetensors")
        for key in ("loras", "embeddings", "checkpoints"):
            os.symlink(o / "victim.safetensors", self.models / key / "victim.safetensors")
        os.symlink(o / "victim_00001_.png", self.output / "victim_00001_.png")

        self.previous = (host._settings.models_dir, host._settings.input_dir, host._settings.output_dir)
        host.configure(models_dir=self.models, input_dir=self.input, output_dir=self.output)
        self.outside_before = _tree(o)

    def close(self) -> None:
        host._settings.models_dir, host._settings.input_dir, host._settings.output_dir = self.previous

    def fill(self, name: str, site: Path) -> str:
        """Expand ``{outside}`` (absolute bait folder) and ``{up}`` (relative path from ``site`` to it)."""
        return name.replace("{outside}", str(self.outside)).replace("{up}", os.path.relpath(self.outside, site))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, models_dir, tiny_handles):
    f = Folders(tmp_path_factory.mktemp("paths"), models_dir, tiny_handles)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def outside_unchanged(folders):
    yield
    assert _tree(folders.outside) == folders.outside_before, "something outside the configured folders changed"


# ============================================================================================== write sites
# (id, name). "{up}" climbs from the folder being written to the bait folder, "{outside}" is its absolute path.
WRITE_NAMES = [
    ("dotdot", ".."),
    ("dotdot-slash", "../escape"),
    ("up-to-outside", "{up}/escape"),
    ("nested-dotdot", "a/../../escape"),
    ("backslash-dotdot", "..\\escape"),
    ("absolute", "{outside}/escape"),
    ("home", "~/escape"),
    ("windows-drive", "C:\\escape"),
    ("windows-drive-relative", "C:escape"),
    ("unc", "\\\\server\\share\\escape"),
    ("symlinked-folder", "link/escape"),
    ("symlinked-file", "victim"),
    ("nul-char", "a\x00b"),
    ("control-char", "a\x01b"),
    ("newline", "a\nb"),
    ("escape-char", "a\x1b[31mb"),
    ("del-char", "a\x7fb"),
    ("bidi-override", "a\u202egpj.exe"),
    *[(f"char-{n}", f"a{c}b") for n, c in
      [("lt", "<"), ("gt", ">"), ("colon", ":"), ("quote", '"'), ("pipe", "|"), ("question", "?"), ("star", "*")]],
    ("very-long", "x" * 300),
    ("very-long-multibyte", "猫" * 100),
    ("very-long-path", "/".join(["d" * 200] * 30)),
    ("reserved-CON", "CON"),
    ("reserved-nul-ext", "nul.txt"),
    ("reserved-com1-in-folder", "sub/com1"),
    ("reserved-lpt9", "LPT9"),
    ("reserved-aux-folder", "aux/x"),
    ("only-dots", "..."),
    ("trailing-dot-space", "name. "),
]

SAVE_NODES = {
    # node id -> (models sub-folder, extension, extra inputs)
    "FinetuneSaveLoRA": ("loras", ".safetensors", lambda f: dict(lora=f.lora, pipe=f.pipe, layout="kohya")),
    "FinetuneSaveEmbedding": ("embeddings", ".safetensors", lambda f: dict(embedding=f.embedding, pipe=f.pipe)),
    "FinetuneSaveCheckpoint": ("checkpoints", ".safetensors",
                               lambda f: dict(pipe=f.pipe, format="single_file", dtype="fp16")),
}


def _bad_components(rel: Path) -> list[str]:
    problems = []
    for part in rel.parts:
        if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in part):
            problems.append(f"control/format character in {part!r}")
        if ODD_CHARS & set(part):
            problems.append(f"{''.join(sorted(ODD_CHARS & set(part)))} in {part!r}")
        if part.split(".")[0].strip().upper() in WINDOWS_RESERVED:
            problems.append(f"reserved device name {part!r}")
        if len(part.encode()) > 255:
            problems.append(f"component longer than 255 bytes ({len(part.encode())})")
        if part != part.rstrip(" ."):
            problems.append(f"trailing dot/space in {part!r}")
    return problems


def _check_write(call, node: str, input: str, root: Path, folders: Folders) -> None:
    """Refused with node + input + Fix, or written inside ``root`` under a clean name."""
    before = _tree(root)
    try:
        call()
    except FinetuneError as exc:
        msg = str(exc)
        assert node in msg and f"input '{input}'" in msg and "Fix:" in msg, msg
        return
    new = sorted(set(_tree(root)) - set(before))
    assert new, "nothing was refused and nothing was written"
    for rel in new:
        path = root / rel
        assert path.resolve().is_relative_to(root.resolve()), f"{rel} resolves outside {root}"
        problems = _bad_components(Path(rel))
        assert not problems, f"accepted and written as {rel!r}: {problems}"


def _write_params():
    params = []
    for node in (*SAVE_NODES, "SaveImage"):
        for case, name in WRITE_NAMES:
            params.append(pytest.param(node, name, id=f"{node}-{case}"))
    return params


@pytest.mark.parametrize("node,name", _write_params())
def test_write_names_are_confined(node, name, folders, outside_unchanged):
    if node == "SaveImage":
        root = folders.output
        name = folders.fill(name, root)
        images = torch.zeros(1, 8, 8, 3)
        _check_write(lambda: N["SaveImage"]().save_images(images, filename_prefix=name), "SaveImage",
                     "filename_prefix", root, folders)
        return
    key, ext, extra = SAVE_NODES[node]
    root = folders.models / key
    name = folders.fill(name, root)
    cls = N[node]
    _check_write(lambda: cls().run(name=name, overwrite=True, **extra(folders)), node, "name", root, folders)


def test_save_image_prefix_with_format_fields_stays_inside(folders, outside_unchanged):
    """%width%/%date% expansion in the prefix cannot be used to climb out either."""
    images = torch.zeros(1, 8, 8, 3)
    for prefix in ("%year%/../../escape", "%width%/%height%/../../../escape", "..%year%/x"):
        _check_write(lambda p=prefix: N["SaveImage"]().save_images(images, filename_prefix=p), "SaveImage",
                     "filename_prefix", folders.output, folders)


# ============================================================================================== read sites
# Names that must never be read; "{ext}" is the site's extension.
READ_NAMES = [
    ("dotdot", "..", ""),
    ("up-to-bait", "{up}/escape{ext}", ""),
    ("nested-dotdot", "a/../{up}/escape{ext}", ""),
    ("backslash-dotdot", "{up_bs}\\escape{ext}", ""),
    ("absolute", "{outside}/escape{ext}", ""),
    ("etc-passwd", "/etc/passwd", ""),
    ("dotdot-etc-passwd", "../../../../../../../../etc/passwd", ""),
    ("file-url", "file://{outside}/escape{ext}", ""),
    ("home", "~/escape{ext}", ""),
    ("windows-drive", "C:\\escape{ext}", ""),
    ("unc", "\\\\server\\share\\escape{ext}", ""),
    ("symlinked-folder", "link/escape{ext}", ""),
    ("symlinked-entry", "evil{ext}", ""),
    ("nul-char", "a\x00b{ext}", ""),
    ("nul-then-bait", "evil{ext}\x00.txt", ""),
    ("control-char", "a\x01b{ext}", ""),
    ("odd-chars", 'a<>:"|?*b{ext}', ""),
    ("very-long", "x" * 300 + "{ext}", ""),
    ("very-long-path", "/".join(["d" * 200] * 30), ""),
    ("reserved-CON", "CON", ""),
]

READ_SITES = {
    # site -> (node named in the error, input named, extension, folder the name is relative to)
    "TrainingData.folder": ("FinetuneTrainingData", "folder", "", "input"),
    "LoadBase.ckpt_name": ("LoadBase", "ckpt_name", ".safetensors", "checkpoints"),
    "LoadBase.ckpt_name-diffusers": ("LoadBase", "ckpt_name", "", "diffusers"),
    "AddLoRA.lora_name": ("AddLoRA", "lora_name", ".safetensors", "loras"),
    "Sample.prompt-embedding": ("Sample", "prompt", "", "embeddings"),
    "LoadImage.image": ("LoadImage", "image", ".png", "input"),
}


def _read_call(site: str, name: str, folders: Folders):
    if site == "TrainingData.folder":
        return lambda: N["FinetuneTrainingData"]().run(folder=name, resolution=32)
    if site == "LoadBase.ckpt_name":
        return lambda: N["LoadBase"]().run(ckpt_name=name, dtype="fp32", device="cpu")
    if site == "LoadBase.ckpt_name-diffusers":
        return lambda: N["LoadBase"]().run(ckpt_name="diffusers/" + name, dtype="fp32", device="cpu")
    if site == "AddLoRA.lora_name":
        return lambda: N["AddLoRA"]().run(pipe=folders.pipe, lora_name=name, strength_unet=1.0, strength_text=1.0)
    if site == "Sample.prompt-embedding":
        return lambda: N["Sample"]().run(pipe=folders.pipe, prompt=f"a embedding:{name} circle", seed=0, steps=1,
                                         cfg=1.0, sampler_name="euler", scheduler="normal", width=32, height=32,
                                         batch_size=1)
    if site == "LoadImage.image":
        return lambda: N["LoadImage"]().load_image(name)
    raise AssertionError(site)


def _read_params():
    params = []
    for site in READ_SITES:
        for case, name, _ in READ_NAMES:
            params.append(pytest.param(site, name, id=f"{site}-{case}"))
        if site == "LoadImage.image":
            for case, name in (("annotated-output-dotdot", "../outside/escape.png [output]"),
                               ("annotated-temp-dotdot", "../../outside/escape.png [temp]"),
                               ("annotated-input-link", "link/escape.png [input]")):
                params.append(pytest.param(site, name, id=f"{site}-{case}"))
    return params


@pytest.mark.parametrize("site,name", _read_params())
def test_read_names_are_confined(site, name, folders, tmp_path, monkeypatch, outside_unchanged):
    node, input, ext, base = READ_SITES[site]
    folder = folders.input if base == "input" else folders.models / base
    rel_up = os.path.relpath(folders.outside, folder)
    name = name.replace("{up_bs}", rel_up.replace("/", "\\")).replace("{ext}", ext)
    name = folders.fill(name, folder)
    name = name.replace("escape", {"Sample.prompt-embedding": "emb", "LoadBase.ckpt_name-diffusers": "model"}
                        .get(site, "escape"))
    watch = Watch(monkeypatch, tmp_path / "sentinel")
    try:
        with pytest.raises(FinetuneError) as info:
            _read_call(site, name, folders)()
        if site == "LoadImage.image":
            assert N["LoadImage"].VALIDATE_INPUTS(name) is not True
    finally:
        monkeypatch.undo()
    problems = watch.violations([folders.root, tmp_path], [folders.outside, Path("/etc/passwd")])
    assert not problems, "read outside the configured folders:\n" + "\n".join(problems)
    msg = str(info.value)
    assert node in msg and f"input '{input}'" in msg and "Fix:" in msg, msg


def test_bait_is_readable_through_a_legal_name(folders):
    """Control: the same files copied inside the folders load fine, so the refusals above are real refusals."""
    shutil.copytree(folders.outside / "escape", folders.input / "legal")
    shutil.copy(folders.outside / "escape.safetensors", folders.models / "loras" / "legal.safetensors")
    shutil.copy(folders.outside / "emb.safetensors", folders.models / "embeddings" / "legal_emb.safetensors")
    shutil.copy(folders.outside / "escape.png", folders.input / "legal.png")
    assert len(N["FinetuneTrainingData"]().run(folder="legal", resolution=32)[0]) == 1
    out = N["AddLoRA"]().run(pipe=folders.pipe, lora_name="legal.safetensors", strength_unet=1.0, strength_text=1.0)
    assert len((out["result"] if isinstance(out, dict) else out)[0].patches) == 1
    N["Sample"]().run(pipe=folders.pipe, prompt="embedding:legal_emb", seed=0, steps=1, cfg=1.0,
                      sampler_name="euler", scheduler="normal", width=32, height=32, batch_size=1)
    assert N["LoadImage"]().load_image("legal.png")[0].shape == (1, 32, 32, 3)


# ============================================================================================== hostile workflows
class Watch:
    """Records file opens, directory listings, weight loads and process creation while a workflow runs."""

    def __init__(self, monkeypatch, sentinel: Path) -> None:
        self.sentinel = sentinel
        self.opened: list[tuple[str, str]] = []
        self.listed: list[str] = []
        self.spawned: list[str] = []
        real_open, real_os_open = builtins.open, os.open
        real_listdir, real_scandir = os.listdir, os.scandir

        def rec_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.opened.append((os.fsdecode(file), mode))
            return real_open(file, mode, *args, **kwargs)

        def rec_os_open(path, flags, *args, **kwargs):
            self.opened.append((os.fsdecode(path), "w" if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) else "r"))
            return real_os_open(path, flags, *args, **kwargs)

        def rec_listdir(path="."):
            if isinstance(path, (str, bytes, os.PathLike)):
                self.listed.append(os.fsdecode(path))
            return real_listdir(path)

        def rec_scandir(path="."):
            if isinstance(path, (str, bytes, os.PathLike)):
                self.listed.append(os.fsdecode(path))
            return real_scandir(path)

        def spawn(kind):
            def refuse(*args, **kwargs):
                self.spawned.append(f"{kind}{args!r}")
                raise AssertionError(f"a workflow started a process: {kind}{args!r}")
            return refuse

        monkeypatch.setattr(builtins, "open", rec_open)
        monkeypatch.setattr(io, "open", rec_open)
        monkeypatch.setattr(os, "open", rec_os_open)
        monkeypatch.setattr(os, "listdir", rec_listdir)
        monkeypatch.setattr(os, "scandir", rec_scandir)
        for name in ("system", "popen", "execv", "execve", "execvp", "spawnv", "posix_spawn", "fork"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, spawn(f"os.{name}"))
        monkeypatch.setattr(subprocess, "Popen", spawn("subprocess.Popen"))

        import safetensors  # noqa: PLC0415
        import safetensors.torch  # noqa: PLC0415

        real_safe_open, real_load = safetensors.safe_open, torch.load

        def rec_safe_open(path, *args, **kwargs):
            self.opened.append((os.fsdecode(path), "r"))
            return real_safe_open(path, *args, **kwargs)

        def rec_load(f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                self.opened.append((os.fsdecode(f), "r"))
            return real_load(f, *args, **kwargs)

        monkeypatch.setattr(safetensors, "safe_open", rec_safe_open)
        monkeypatch.setattr(safetensors.torch, "safe_open", rec_safe_open)
        monkeypatch.setattr(torch, "load", rec_load)

    def violations(self, allowed_write: list[Path], forbidden: list[Path]) -> list[str]:
        bad = []
        allowed_write = [p.resolve() for p in allowed_write]
        forbidden = [p.resolve() for p in forbidden]
        for path, mode in self.opened + [(p, "list") for p in self.listed]:
            try:
                real = Path(path).resolve()
            except (OSError, ValueError, RuntimeError):
                continue
            if any(real == f or real.is_relative_to(f) for f in forbidden):
                bad.append(f"{mode}: {path}")
            elif mode not in ("r", "rb", "list") and not any(real.is_relative_to(a) for a in allowed_write):
                if "__pycache__" not in real.parts:
                    bad.append(f"write outside the configured folders: {path} ({mode})")
        if self.spawned:
            bad += self.spawned
        if self.sentinel.exists():
            bad.append(f"the sentinel {self.sentinel} was created: code from the workflow ran")
        return bad


PAYLOADS = [
    "__import__('os').system('touch {sentinel}')",
    "{{ __import__('os').system('touch {sentinel}') }}",
    "${{touch {sentinel}}}",
    "$(touch {sentinel})",
    "`touch {sentinel}`",
    "; touch {sentinel} #",
    "{0.__class__.__init__.__globals__} %(x)s %s {sentinel}",
    "exec(\"open('{sentinel}', 'w').write('x')\")",
]
PATHS = ["/etc/passwd", "../../../../../../../../etc/passwd", "{outside}/escape", "link/escape",
         "file:///etc/passwd", "~root/.bashrc"]


def _hostile_calls(folders: Folders, text: str, path: str, training: bool) -> list[tuple[str, dict]]:
    """Each node with every STRING input set to ``text`` and every file-name input set to ``path``."""
    ds = N["FinetuneTrainingData"]().run(folder="[example] red-circle", resolution=32)[0]
    train = dict(steps=1, learning_rate=1e-4, batch_size=1, grad_accum=1, lr_schedule="constant", warmup_steps=0,
                 optimizer="adamw", precision="fp32", gradient_checkpointing=False, min_snr_gamma=0.0,
                 noise_offset=0.0, seed=0, validation_prompt=text, validation_size=32, validation_steps=1)
    p = folders.pipe
    trainers = [
        ("FinetuneTrainLoRA", dict(pipe=p, dataset=ds, rank=2, alpha=2.0, targets="attention",
                                   train_text_encoder=False, text_learning_rate=0.0, **train)),
        ("LearnEmbedding", dict(pipe=p, dataset=ds, token=text, initializer=text, num_vectors=1,
                                templates="object", **train)),
        ("DreamBoothTrain", dict(pipe=p, dataset=ds, instance_prompt=text, class_prompt=text, method="lora",
                                 prior_preservation=True, prior_loss_weight=1.0, prior_mode="base_prediction",
                                 num_class_images=0, train_text_encoder=False, text_learning_rate=0.0, rank=2,
                                 alpha=2.0, **train)),
    ] if training else []
    return trainers + [
        ("LoadBase", dict(ckpt_name=path, dtype="fp32", device="cpu")),
        ("LoadBase", dict(ckpt_name="diffusers/" + path, dtype="fp32", device="cpu")),
        ("LoadBase", dict(ckpt_name="nope", dtype="fp32", device="cpu", hub_id=path)),
        ("AddLoRA", dict(pipe=p, lora_name=path, strength_unet=1.0, strength_text=1.0)),
        ("NegativePrompt", dict(text=text)),
        ("Sample", dict(pipe=p, prompt=f"{text} embedding:{path}", seed=0, steps=1, cfg=1.0, sampler_name="euler",
                        scheduler="normal", width=32, height=32, batch_size=1)),
        ("Sample", dict(pipe=p, prompt=text, seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal",
                        width=32, height=32, batch_size=1)),
        ("FinetuneTrainingData", dict(folder=path, resolution=32, caption_prefix=text)),
        ("FinetuneTrainingData", dict(folder=text, resolution=32, caption_prefix=text)),
        ("FinetuneTrainingDataFromImages", dict(images=torch.rand(1, 32, 32, 3), captions=text, resolution=32,
                                                caption_prefix=text)),
        ("FinetuneSaveLoRA", dict(lora=folders.lora, pipe=p, name=path, layout="kohya")),
        ("FinetuneSaveLoRA", dict(lora=folders.lora, pipe=p, name=text, layout="kohya")),
        ("FinetuneSaveEmbedding", dict(embedding=folders.embedding, pipe=p, name=path)),
        ("FinetuneSaveEmbedding", dict(embedding=folders.embedding, pipe=p, name=text)),
        ("FinetuneSaveCheckpoint", dict(pipe=p, name=path)),
        ("SaveImage", dict(images=torch.zeros(1, 8, 8, 3), filename_prefix=path)),
        ("SaveImage", dict(images=torch.zeros(1, 8, 8, 3), filename_prefix=text)),
        ("LoadImage", dict(image=path)),
        ("LoadImage", dict(image=text)),
    ]


@pytest.mark.parametrize("payload", PAYLOADS, ids=[f"payload{i}" for i in range(len(PAYLOADS))])
def test_hostile_strings_run_no_code_and_touch_nothing_outside(payload, folders, tmp_path, monkeypatch,
                                                                 outside_unchanged):
    sentinel = tmp_path / "pwned"
    text = payload.replace("{sentinel}", str(sentinel))
    passwd = Path("/etc/passwd")
    passwd_stat = passwd.stat() if passwd.exists() else None
    calls = [c for i, path in enumerate(PATHS)
             for c in _hostile_calls(folders, text, folders.fill(path, folders.input), training=i == 0)]
    watch = Watch(monkeypatch, sentinel)
    unexpected = []
    for node, kwargs in calls:
        cls = N[node]
        try:
            getattr(cls(), cls.FUNCTION)(**kwargs)
        except FinetuneError:
            pass
        except Exception as exc:  # noqa: BLE001 - collected, reported together
            unexpected.append(f"{node}: {type(exc).__name__}: {exc}")
    monkeypatch.undo()
    allowed = [folders.root, tmp_path, Path(os.environ.get("COMFY_FINETUNE_CACHE", folders.models))]
    problems = watch.violations(allowed, [folders.outside, passwd, Path.home() / ".bashrc"])
    assert not problems, "\n".join(problems)
    assert not unexpected, "\n".join(unexpected)
    if passwd_stat is not None:
        assert passwd.stat().st_mtime_ns == passwd_stat.st_mtime_ns


def test_hostile_api_and_ui_workflows(folders, tmp_path, monkeypatch, outside_unchanged):
    """Whole workflows through the runner: hostile class types, ids, input names, values and widget values."""
    import json  # noqa: PLC0415

    import comfy_finetune  # noqa: PLC0415
    from comfy_finetune.headless.runner import run_workflow  # noqa: PLC0415

    sentinel = tmp_path / "pwned"
    code = f"__import__('os').system('touch {sentinel}')"
    ui = json.loads((Path(comfy_finetune.__file__).parent / "example_workflows" / "Generate images.json").read_text())
    hostile_ui = json.loads(json.dumps(ui))
    for node in hostile_ui["nodes"]:
        node["widgets_values"] = [code if isinstance(v, str) else v for v in node.get("widgets_values") or []]
        node["title"] = code
    paths_ui = json.loads(json.dumps(ui))
    for node in paths_ui["nodes"]:
        node["widgets_values"] = ["/etc/passwd" if isinstance(v, str) else v for v in node.get("widgets_values") or []]
    api = {
        code: {"class_type": code, "inputs": {code: code}, "_meta": {"title": code}},
    }
    api_known = {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "../../../../etc/passwd", "dtype": "fp32",
                                                   "device": "cpu", "hub_id": code, code: code}},
        "2": {"class_type": "Sample", "inputs": {"pipe": ["1", 0], "prompt": code, "seed": 0, "steps": 1, "cfg": 1.0,
                                                 "sampler_name": code, "scheduler": "normal", "width": 32,
                                                 "height": 32, "batch_size": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "/etc/passwd"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "/etc/passwd"}},
    }
    workflow_file = tmp_path / "hostile.json"
    workflow_file.write_text(json.dumps(hostile_ui))
    watch = Watch(monkeypatch, sentinel)
    for wf in (hostile_ui, paths_ui, api, api_known, workflow_file):
        with pytest.raises(FinetuneError):
            run_workflow(wf, [f"1.hub_id={code}"] if wf is api_known else None)
    monkeypatch.undo()
    problems = watch.violations([folders.root, tmp_path], [folders.outside, Path("/etc/passwd")])
    assert not problems, "\n".join(problems)
