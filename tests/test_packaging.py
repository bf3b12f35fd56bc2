"""Packaging metadata: the Comfy Registry's pyproject fields, requirements.txt (what ComfyUI-Manager installs) against
pyproject's dependencies, the icon, and the template thumbnails next to every example workflow.

No network and no ComfyUI needed (the real host serving the templates is checked in test_comfyui_integration.py).
"""

from __future__ import annotations

import ast
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
# modules the pack imports that come with ComfyUI itself (only host.py imports them)
HOST_MODULES = {"comfy", "comfy_execution", "folder_paths", "server", "nodes", "comfy_api"}
# imported directly but installed by a listed requirement (a dependency of diffusers and transformers)
TRANSITIVE = {"huggingface_hub"}
IMPORT_NAME_TO_DIST = {"PIL": "pillow"}


def _tool_comfy() -> dict:
    return PYPROJECT["tool"]["comfy"]


def _spec_name(line: str) -> str:
    name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> dict[str, str]:
    out = {}
    for raw in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out[_spec_name(line)] = line.replace(" ", "")
    return out


def _dependencies() -> dict[str, str]:
    return {_spec_name(d): d.replace(" ", "") for d in PYPROJECT["project"]["dependencies"]}


# ---------------------------------------------------------------------------------------------- registry fields
def test_registry_required_fields():
    project, comfy = PYPROJECT["project"], _tool_comfy()
    # [project].name is the registry's node id: < 100 chars, letters/digits/-/_/., no doubled or leading specials
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]  # X.Y.Z
    assert project["description"].strip()
    repo_url = project["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo_url), repo_url
    assert project.get("license"), "a license (file or text)"
    publisher = comfy.get("PublisherId", "")
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", publisher), f"PublisherId {publisher!r}"
    assert comfy.get("DisplayName", "").strip()
    requires = comfy.get("requires-comfyui", "")
    assert re.fullmatch(r">=\d+\.\d+\.\d+", requires), requires


def test_no_web_key_so_the_extension_is_registered_once():
    """ComfyUI registers ``[tool.comfy] web`` under the project name *and* ``WEB_DIRECTORY`` under the folder
    name: with both, every extension script would load twice in the browser."""
    init = ast.parse((REPO / "__init__.py").read_text(encoding="utf-8"))
    names = {t.id for node in init.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    assert "WEB_DIRECTORY" in names
    assert "web" not in _tool_comfy()


def _image_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    if path.suffix == ".svg":
        root = ET.fromstring(data)
        assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
        assert not list(root.iter("{http://www.w3.org/2000/svg}script")), "no scripts in the icon"
        return int(float(root.attrib["width"])), int(float(root.attrib["height"]))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", data[16:24])
    raise AssertionError(f"{path.name}: not an SVG or PNG")


def test_icon_is_a_small_image_in_this_repository():
    """Icon: SVG/PNG/JPG/GIF at most 800 x 400 px (registry), here an SVG in docs/ served by the repository."""
    icon = _tool_comfy()["Icon"]
    owner_repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    m = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/[\w.-]+/(.+)", icon)
    assert m, f"Icon {icon!r} should point at this repository's raw files ({owner_repo})"
    path = REPO / m.group(1)
    assert path.is_file(), f"the icon {m.group(1)} is not in the repository"
    assert path.suffix in (".svg", ".png", ".jpg", ".gif")
    w, h = _image_size(path)
    assert 32 <= w <= 800 and 32 <= h <= 400, (w, h)
    assert path.stat().st_size < 20_000


# ---------------------------------------------------------------------------------------------- requirements
def test_requirements_agree_with_pyproject_except_torch():
    """ComfyUI-Manager installs requirements.txt into ComfyUI's python; pip uses pyproject. Same packages and
    bounds, except torch: ComfyUI brings its own build (CUDA/ROCm/CPU) and the manager must never replace it."""
    req, deps = _requirements(), _dependencies()
    assert "torch" not in req and not any(n in req for n in ("torchvision", "torchaudio", "xformers"))
    assert "torch" in deps, "pip install (without ComfyUI) needs torch"
    assert {k: v for k, v in deps.items() if k != "torch"} == req


def _package_files() -> list[Path]:
    """The .py files pip installs: each package of ``[tool.setuptools] packages`` (the repo root is the package)."""
    files = []
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]:
        folder = REPO.joinpath(*pkg.split(".")[1:])
        files += sorted(folder.glob("*.py"))
    return files


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level modules the pack imports outside try/except-ImportError blocks: ``module -> [files]``."""
    found: dict[str, list[str]] = {}
    files = _package_files()
    assert REPO / "host.py" in files and len(files) > 20, files
    for path in files:
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top != "comfy_finetune":
                    found.setdefault(top, []).append(str(rel))
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    for t in ([handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts):
        if isinstance(t, ast.Name):
            names.append(t.id)
    return handler.type is None or bool({"ImportError", "ModuleNotFoundError", "Exception"} & set(names))


def test_every_required_import_is_a_requirement():
    """What the pack imports unconditionally is installed by requirements.txt (or comes with ComfyUI/torch);
    optional extras (bitsandbytes, prodigyopt, psutil) are imported inside try/except ImportError."""
    req = set(_requirements()) | {"torch"}
    missing = {}
    for mod, files in _third_party_imports().items():
        if mod in HOST_MODULES or mod in TRANSITIVE:
            continue
        dist = IMPORT_NAME_TO_DIST.get(mod, mod).lower().replace("_", "-")
        if dist not in req:
            missing[mod] = sorted(set(files))
    assert not missing, f"imported but not in requirements.txt: {missing}"


# ---------------------------------------------------------------------------------------------- thumbnails
def test_every_example_has_a_thumbnail(repo_tool):
    """ComfyUI's template browser shows ``<stem>.jpg`` for ``<stem>.json``: one per workflow, none orphaned,
    256 x 256 JPEG under 40 KB (made by tools/make_thumbnails.py)."""
    tool = repo_tool("make_thumbnails")
    assert EXAMPLES
    problems = [msg for w in EXAMPLES if (msg := tool.check_thumbnail(w.with_suffix(".jpg")))]
    assert not problems, problems
    orphans = [j.name for j in (REPO / "example_workflows").glob("*.jpg") if not j.with_suffix(".json").exists()]
    assert not orphans, orphans


def test_examples_use_current_node_ids(repo_tool):
    """The templates name each of this pack's nodes by its current id, never by an old one kept only so older saved
    workflows load (hidden from search), and every training node in them is one the thumbnail tool shortens."""
    import json  # noqa: PLC0415

    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS, RENAMED_NODE_IDS  # noqa: PLC0415

    tool = repo_tool("make_thumbnails")
    host_nodes = {"LoadImage", "SaveImage", "PreviewImage", "Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
    trainers = 0
    for w in EXAMPLES:
        nodes = json.loads(w.read_text(encoding="utf-8"))["nodes"]
        kinds = [node["type"] for node in nodes]
        for node in nodes:
            kind = node["type"]
            assert kind in host_nodes or kind in NODE_CLASS_MAPPINGS, f"{w.name}: unknown node type {kind}"
            assert kind not in RENAMED_NODE_IDS, f"{w.name}: old id {kind}, now {RENAMED_NODE_IDS.get(kind)}"
            assert node.get("properties", {}).get("Node name for S&R", kind) == kind, (w.name, kind)
        in_example = sum(kind in tool.TRAINING_NODES for kind in kinds)
        assert len(tool.training_step_caps(w, 1)) == in_example, w.name
        trainers += in_example
    assert trainers >= 3, "the LoRA, Textual Inversion and DreamBooth examples each have a training node"


def test_example_titles_are_readable():
    """The file stem is the template's title in the browser (and its description with - and _ as spaces)."""
    for w in EXAMPLES:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9 ()]+", w.stem), f"{w.name}: title {w.stem!r}"
        assert "_" not in w.stem and "-" not in w.stem


def test_thumbnail_composer_fits_noise_in_the_size_limit(tmp_path, repo_tool):
    """The worst case for JPEG (pure noise, 9 tiles) still fits under the byte limit, as a square JPEG."""
    import numpy as np
    from PIL import Image

    tool = repo_tool("make_thumbnails")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(9)]
    data = tool.compose_thumbnail(images, size=256, max_bytes=40_000)
    out = tmp_path / "x.jpg"
    out.write_bytes(data)
    assert tool.check_thumbnail(out) is None and len(data) <= 40_000
    with Image.open(out) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (256, 256, 3) and pixels.std() > 20, "the tiles are missing"
    with pytest.raises(ValueError, match="no images"):
        tool.compose_thumbnail([])
    with pytest.raises(ValueError, match="does not fit"):
        tool.compose_thumbnail(images, size=256, max_bytes=500)


def test_thumbnail_check_mode_flags_missing_and_orphaned(tmp_path, capsys, repo_tool):
    """``--check`` exits 1 naming a workflow without a thumbnail and a thumbnail without a workflow."""
    tool = repo_tool("make_thumbnails")
    (tmp_path / "A flow.json").write_text("{}", encoding="utf-8")
    (tmp_path / "Gone.jpg").write_bytes(b"\xff\xd8\xff")
    assert tool.main(["--check", "--examples", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "A flow.jpg is missing" in err and "Gone.jpg belongs to no workflow" in err
