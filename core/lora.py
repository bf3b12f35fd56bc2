"""LoRA weights in and out: kohya/A1111, diffusers/PEFT and ComfyUI files <-> one in-memory form.

:class:`LoraWeights` keys every adapted module by ``(component, path)``: component ``"unet"``, ``"te1"`` (SD1/SD2
text encoder, SDXL CLIP-L) or ``"te2"`` (SDXL bigG); path as the loaded model's ``named_modules()`` gives it.
:func:`parse_lora` reads any supported layout and reports the keys it could not place; :func:`to_kohya_state_dict`
writes what ComfyUI, A1111, diffusers and kohya all load; :func:`to_diffusers_state_dict` writes
the PEFT layout of diffusers' training scripts with its ``lora_adapter_metadata``.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import adapters
from .embeddings import Embedding, bundle_state, bundled_embeddings, split_bundled
from .errors import FinetuneError
from .families import Family, check_family, info, modelspec, modelspec_keys, sgm_unet_names
from .ldm_names import unet_name_map
from .lora_keys import (
    ModuleResolver,
    canonical_te_path,
    detect_lora_family,
    family_from_metadata,
    split_part,
    te_target_name,
)
from .safeio import load_weights  # the one place untrusted weight files are opened

__all__ = [
    "LoraModule", "LoraWeights", "parse_lora", "lora_from_file", "to_kohya_state_dict", "to_diffusers_state_dict",
    "detect_lora_family", "ADAPTER_METADATA_KEY",
]

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the PEFT config diffusers >= 0.34 writes into LoRA files
_DIFFUSERS_COMPONENT = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
_SAFE_SUFFIXES = (".safetensors", ".sft")
_PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", ADAPTER_METADATA_KEY, "format")


@dataclass
class LoraModule(adapters._LowRank):
    """One adapted module: ``delta W = strength * (alpha / rank) * up @ down`` (rank = ``down.shape[0]``).

    Shapes: Linear ``down [r, in]``, ``up [out, r]``; 1x1 conv ``[r, in, 1, 1]`` / ``[out, r, 1, 1]``; kohya LoCon
    3x3 conv ``down [r, in, 3, 3]``, ``up [out, r, 1, 1]``; LyCORIS Tucker adds ``mid [r, r, k, k]``.
    ``alpha`` None means scale 1 (``alpha = rank``), as in ComfyUI and A1111. With ``dora_scale`` (DoRA) the
    layer's new weight is ComfyUI's DoRA merge of ``delta W`` (at strength 1) into the current weight, then
    blended by the strength (:func:`.adapters.weight_decompose`; ``additive`` is False, use ``apply``).
    """

    down: Tensor
    up: Tensor
    alpha: float | None
    mid: Tensor | None = None
    bias: Tensor | None = None  # a full bias difference beside the low-rank weight (ComfyUI's trainer: .diff_b)
    # DoRA magnitudes (kohya/LyCORIS ``dora_scale``): [out, 1] (Linear) / [out, 1, 1, 1] (conv) normalise each
    # output row of the merged weight; [1, in] / [1, in, 1, 1] each input column. None: plain LoRA.
    dora_scale: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank if self.alpha else 1.0

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> Tensor:
        """The weight delta in fp32, shaped like the target weight (``shape``, default from the factors)."""
        down, up = self.down.float(), self.up.float()
        if self.mid is not None:  # Tucker: delta[p, r, k, l] = sum_ij mid[i, j, k, l] * down[j, r] * up[p, i]
            full = torch.einsum("ijkl,jr,pi->prkl", self.mid.float(), down.flatten(1), up.flatten(1))
        else:
            full = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        full = full * (strength * self.scale)
        return full.reshape(tuple(shape)) if shape is not None else full

    def target_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module adapts, as far as the factors tell (Linear or conv)."""
        if self.mid is not None:
            return (int(self.up.shape[0]), int(self.down.shape[1]), *self.mid.shape[2:])
        return (int(self.up.shape[0]), *self.down.shape[1:])

    kind = "lora"
    #: The parts of a file's group this module applies (the rest is reported as not applied).
    applies = frozenset({"down", "up", "mid", "alpha", "diff_b", "dora_scale"})

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.bias is None else self.bias.float() * strength

    def fingerprint(self) -> float:
        fp = float(self.down.detach().double().sum()) + 3.0 * float(self.up.detach().double().sum())
        fp += 5.0 * float(self.bias.detach().double().sum()) if self.bias is not None else 0.0
        return fp + (7.0 * float(self.dora_scale.detach().double().sum()) if self.dora_scale is not None else 0.0)


#: Any module a LoRA file carries: LoRA / LoCon / Tucker (each optionally DoRA), or a LoHa, LoKr, OFT, BOFT, full
#: difference or replacement weight (core/adapters.py).
Adapter = (LoraModule | adapters.LohaModule | adapters.LokrModule | adapters.OftModule | adapters.BoftModule
           | adapters.DiffModule | adapters.SetModule)
#: Kinds whose factors are fitted to one layer: in a file whose other modules fit, one that does not is damaged.
_FITTED_KINDS = frozenset({"loha", "lokr", "oft", "boft", "set"})
_LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr", "oft": "diag-oft", "boft": "boft"}  # kind -> LyCORIS' algo
_FIX_DAMAGED = "the file is damaged or was made for another model; re-export it from its trainer"


@dataclass
class LoraWeights:
    """A LoRA as modules keyed by ``(component, module path)``, plus the file's metadata and a display name."""

    family: Family | None
    modules: dict[tuple[str, str], Adapter]
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "lora"
    #: Embeddings bundled with the LoRA (``bundle_emb.<name>.*`` keys; pivotal tuning), by name.
    embeddings: dict[str, Embedding] = field(default_factory=dict)

    def components(self) -> set[str]:
        return {c for c, _ in self.modules}


# ------------------------------------------------------------------------------------------------- reading

def _adapter_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per diffusers component (``unet``, ``text_encoder``...), the LoraConfig kwargs stored in the metadata."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        comp, _, name = key.partition(".")
        out.setdefault(comp, {})[name] = value
    return out


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    # PEFT's get_pattern_key: a pattern matches a module whose name ends with it after a dot.
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", path):
            return value
    return None


def _metadata_alpha(cfg: Mapping[str, Any], path: str, rank: int) -> float | None:
    if not cfg:
        return None
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path)
    if alpha is None:
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, te_target_name(path))
    if alpha is None:
        alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    return alpha * rank**0.5 if cfg.get("use_rslora") else alpha  # rsLoRA scale alpha/sqrt(r) as alpha'/r


def parse_lora(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None, *, family: Family | None,
               unet_config: Mapping[str, Any] | None, unet_modules: Collection[str] | Mapping[str, Any] | None,
               te_modules: list[Collection[str] | Mapping[str, Any]] | None, name: str = "lora",
               input: str | None = "lora_name") -> tuple[LoraWeights, list[str]]:
    """Read a LoRA state dict of any supported layout into :class:`LoraWeights`.

    Args:
        state_dict: the file's tensors.
        metadata: the safetensors header metadata (str -> str), or None.
        family: the target model's family; a LoRA detected as another family raises. None skips the check.
        unet_config: the target UNet's config (LDM/SGM names need it).
        unet_modules: the UNet's ``named_modules()`` names, or a mapping name -> weight shape (then every module's
            delta shape is checked: the structural family check for models of unusual widths).
        te_modules: the same per text encoder ([te1] or [te1, te2]).
        name: display name.
        input: the input the LoRA came from, named in errors.
    Returns:
        ``(weights, unmatched keys)``: keys that are not LoRA parts, lack a down/up partner, name no module of
        these models, or repeat a module already read. Nothing is dropped silently.
    Raises:
        FinetuneError(input=input) on a family mismatch or when fewer than half of the LoRA's modules fit the
            model (no node: the calling node is named where the error leaves it).
    """
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    state_dict, bundles = split_bundled(dict(state_dict))  # embeddings bundled in the file (bundle_emb.*)
    lora_family, why = detect_lora_family({k: v for k, v in state_dict.items() if isinstance(v, Tensor)}, metadata)
    if (family is not None and Family(family) is Family.KOLORS and lora_family is Family.SDXL
            and family_from_metadata(metadata) is None and why.startswith("its cross-attention")):
        # Kolors' UNet has SDXL's shapes: a file that says nothing else (no metadata naming SDXL, no second text
        # encoder) cannot be told apart and is taken as Kolors; one whose metadata names SDXL is refused below
        lora_family = Family.KOLORS
    if family is not None:
        check_family("LoRA", lora_family, family, why=why, input=input)
    _check_dora_claim(state_dict, metadata, input)

    groups: dict[str, dict[str, Tensor]] = {}
    group_keys: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        split = split_part(key) if isinstance(value, Tensor) else None
        if split is None:
            unmatched.append(key)
            continue
        module_key, part = split
        if part in groups.setdefault(module_key, {}):
            unmatched.append(key)  # two spellings of the same part
            continue
        groups[module_key][part] = value
        group_keys.setdefault(module_key, []).append(key)

    resolver = ModuleResolver(unet_config, unet_modules, te_modules)
    adapter_cfg = _adapter_alphas(metadata)
    modules: dict[tuple[str, str], Adapter] = {}
    misfits: list[str] = []
    damaged: list[str] = []  # modules of fitted kinds (LoHa, LoKr, OFT, BOFT, set) that do not fit their layer
    placed: set[str] = set()
    for module_key, parts in groups.items():
        lora_pair = "down" in parts and "up" in parts
        other = None
        if not lora_pair:
            try:
                other = adapters.build(parts, float(parts["alpha"].float().item()) if "alpha" in parts else None)
            except ValueError as exc:
                raise FinetuneError(f"module '{module_key}' cannot be read: {exc}", input=input,
                                    fix="the file is damaged or of a layout this pack does not read; re-export it "
                                        "from its trainer") from exc
        target = resolver.resolve(module_key) if lora_pair or other is not None else None
        if target is None or target in modules:
            unmatched.extend(group_keys[module_key])
            continue
        comp, path = target
        if lora_pair:
            rank = int(parts["down"].shape[0])
            if "alpha" in parts:
                alpha: float | None = float(parts["alpha"].float().item())
            else:
                alpha = _metadata_alpha(adapter_cfg.get(_DIFFUSERS_COMPONENT[comp], {}), path, rank)
                alpha = float(rank) if alpha is None else alpha
            module: Adapter = LoraModule(parts["down"], parts["up"], alpha, parts.get("mid"), parts.get("diff_b"),
                                         dora_scale=parts.get("dora_scale"))
        else:
            module = other
        want = resolver.shape(comp, path)
        misfit = module_misfit(module, want)
        if misfit is not None:
            misfits.append(f"{module_key}: {misfit}")
            if module.kind in _FITTED_KINDS:
                damaged.append(misfits[-1])
            unmatched.extend(group_keys[module_key])
            continue
        dora_misfit = module.dora_misfit(want) if want is not None else None
        if dora_misfit is not None:
            raise FinetuneError(f"module '{module_key}' is a DoRA whose magnitudes do not fit its layer: "
                                f"{dora_misfit}", input=input,
                                fix=f"{_FIX_DAMAGED} (a DoRA's dora_scale is [out, 1] per output row or [1, in] per "
                                    "input column)")
        # parts this module does not apply (e.g. a full .diff beside low-rank factors) are listed, not dropped
        unread = set(parts) - module.applies
        unmatched.extend(k for k in group_keys[module_key] if split_part(k)[1] in unread)
        modules[target] = module
        placed.add(module_key)

    # Structural family check (works for any width, e.g. tiny test models): a LoRA made for this model places
    # (nearly) all of its modules; one made for another family places few of them or with the wrong shapes.
    pairs = [k for k, parts in groups.items() if ("down" in parts and "up" in parts)
             or any(p in parts for p in adapters.MODULE_PARTS)]
    if pairs and 2 * len(modules) < len(pairs):
        target_label = Family(family).label if family is not None else "loaded"
        example = misfits[0] if misfits else next(k for k in pairs if k not in placed)
        raise FinetuneError(
            f"this LoRA does not fit the {target_label} model: only {len(modules)} of its {len(pairs)} modules "
            f"match (e.g. {example})", input=input,
            fix="pick a LoRA trained for the loaded model's family (kohya, diffusers/PEFT or ComfyUI layout)")
    if damaged:  # the file fits this model, but these factors do not fit the layers they name
        raise FinetuneError(f"its factors do not fit the layers they name ({len(damaged)} of {len(pairs)} modules, "
                            f"e.g. {damaged[0]})", input=input, fix=_FIX_DAMAGED)
    weights = LoraWeights(lora_family or (Family(family) if family is not None else None), modules, metadata, name)
    if bundles:
        weights.embeddings = bundled_embeddings(bundles, _token_widths(te_modules), metadata, input=input)
    return weights, unmatched


def _token_widths(te_modules) -> list[int]:
    """The text encoders' token widths where ``te_modules`` maps names to shapes (else none: not checked)."""
    widths = []
    for modules in te_modules or []:
        shape = next((s for n, s in modules.items() if n.endswith("embeddings.token_embedding")), None) \
            if isinstance(modules, Mapping) else None
        if shape is None:
            return []
        widths.append(int(shape[-1]))
    return widths


def module_misfit(module: Adapter, want: Sequence[int] | None) -> str | None:
    """Why ``module`` does not fit a layer whose weight is ``want`` (None: it fits, or no shape to check). Same output
    width and element count fit: a Linear [o, i] and a 1x1 conv [o, i, 1, 1] are interchangeable."""
    if want is None:
        return None
    if isinstance(module, adapters.OftModule | adapters.BoftModule):  # only the output rows are known
        why = module.misfit(want)
        if why is not None:
            return f"{why} (model {list(want)})"
    have = module.target_shape()
    if have is not None and (have[0] != want[0] or _numel(have) != _numel(want)):
        shown = module.describe() if isinstance(module, adapters.LokrModule) else f"{module.kind} {list(have)}"
        return f"{shown} vs model {list(want)}"
    bias = module.bias_delta()
    if bias is not None and tuple(bias.shape) != (want[0],):
        return f"{module.kind} bias {list(bias.shape)} vs model {list(want)}"
    return None


def _dora_claim(metadata: Mapping[str, str]) -> str | None:
    """Where the metadata says the file is a DoRA: LyCORIS' ``dora_wd`` in ``ss_network_args``, or PEFT's
    ``use_dora`` in diffusers' ``lora_adapter_metadata``. None when it does not."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except (TypeError, ValueError):
        args = {}
    if isinstance(args, dict) and str(args.get("dora_wd", "")).strip().lower() in ("true", "1", "yes"):
        return "its ss_network_args say dora_wd"
    if any(cfg.get("use_dora") is True for cfg in _adapter_alphas(metadata).values()):
        return f"its {ADAPTER_METADATA_KEY} say use_dora"
    return None


def _check_dora_claim(state_dict: Mapping[str, Any], metadata: Mapping[str, str], input: str | None) -> None:
    """A file whose metadata says DoRA but that holds no magnitudes (``dora_scale``, or PEFT's
    ``lora_magnitude_vector``) would load as a plain LoRA, which is not the model that was trained: refused."""
    why = _dora_claim(metadata)
    if why and not any("dora_scale" in k or "lora_magnitude_vector" in k for k in state_dict):
        raise FinetuneError(f"the file is marked as a DoRA ({why}) but holds no DoRA magnitudes (no dora_scale "
                            "keys): its low-rank part alone is not the trained model", input=input,
                            fix="re-export the DoRA from its trainer with its dora_scale tensors, or use a plain "
                                "LoRA file")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def lora_from_file(path: str | Path, *, family: Family | None, unet_config: Mapping[str, Any] | None,
                   unet_modules: Collection[str] | Mapping[str, Any] | None,
                   te_modules: list[Collection[str] | Mapping[str, Any]] | None, input: str | None = "lora_name",
                   ) -> tuple[LoraWeights, list[str]]:
    """Load a LoRA file and :func:`parse_lora` it. ``.safetensors`` with metadata; pickles weights-only.

    ``.pt/.ckpt/.bin/.pth`` files go through ``torch.load(weights_only=True)``: a file that needs anything beyond
    tensors and plain containers is refused, never unpickled.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FinetuneError(f"LoRA file not found: {path}", input=input,
                            fix="put the file in models/loras and pick it from the list")
    if suffix not in _SAFE_SUFFIXES and suffix not in _PICKLE_SUFFIXES:
        raise FinetuneError(f"unsupported LoRA file type '{suffix}'", input=input,
                            fix="use .safetensors (or .pt/.ckpt/.bin holding only tensors)")
    state, metadata = load_weights(path, input=input)  # validated header / weights-only
    return parse_lora(state, metadata, family=family, unet_config=unet_config, unet_modules=unet_modules,
                      te_modules=te_modules, name=path.stem, input=input)


# ------------------------------------------------------------------------------------------------- writing

def _most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


def _alpha(module: LoraModule) -> float:
    return float(module.alpha) if module.alpha else float(module.rank)


def _kohya_module_name(comp: str, path: str, family: Family, ldm_map: Mapping[str, str]) -> str:
    if comp == "unet":
        name = ldm_map[path] if sgm_unet_names(family) else path
        return "lora_unet_" + name.replace(".", "_")
    if family is Family.KOLORS:
        raise ValueError(f"a Kolors LoRA adapts the UNet only (ChatGLM3 does not train here); got a module for {comp}")
    prefix = {"te1": "lora_te1_", "te2": "lora_te2_"}[comp] if family is Family.SDXL else "lora_te_"
    if family is not Family.SDXL and comp != "te1":
        raise ValueError(f"{family.label} has one text encoder; got a module for {comp}")
    return prefix + canonical_te_path(path).replace(".", "_")


def to_kohya_state_dict(lora: LoraWeights, *, family: Family, unet_config: Mapping[str, Any],
                        v_prediction: bool | None = None, bundle: bool = True
                        ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Write kohya/A1111 keys and the minimum ``ss_*`` + ModelSpec metadata (what ComfyUI, A1111, kohya and
    diffusers all read).

    SD1/SD2 UNet modules use diffusers names, SDXL ones SGM names; text encoders ``lora_te_`` (SD1/SD2) or
    ``lora_te1_``/``lora_te2_`` (SDXL), always with ``text_model_``. Every module gets its real ``alpha``.
    ``v_prediction`` picks the model's names and resolution in :data:`~.families.MODELSPECS` (SD2:
    ``stable-diffusion-v2-768-v`` at 768 vs ``-v2-512`` at 512); None follows the family's usual prediction.
    ``bundle`` writes the LoRA's bundled embeddings (``bundle_emb.*``, which A1111 reads and ComfyUI's LoRA loader
    reports as keys it did not load).
    """
    family = Family(family)
    ldm_map = unet_name_map(unet_config) if sgm_unet_names(family) else {}
    sd: dict[str, Tensor] = {}
    for (comp, path), module in sorted(lora.modules.items()):
        base = _kohya_module_name(comp, path, family, ldm_map)
        if not isinstance(module, LoraModule):  # LoHa, LoKr, OFT, BOFT, full tensors: the keys they were read from
            sd.update({f"{base}.{part}": t.contiguous() for part, t in module.tensors().items()})
            if module.alpha is not None:
                sd[f"{base}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
            continue
        if module.mid is not None and module.down.ndim != 4:
            raise ValueError(f"{comp}:{path}: lora_mid needs conv factors")
        sd[f"{base}.lora_down.weight"] = module.down.contiguous()
        sd[f"{base}.lora_up.weight"] = module.up.contiguous()
        if module.mid is not None:
            sd[f"{base}.lora_mid.weight"] = module.mid.contiguous()
        sd[f"{base}.alpha"] = torch.tensor(_alpha(module), dtype=torch.float32)
        if module.bias is not None:
            sd[f"{base}.diff_b"] = module.bias.contiguous()
        if module.dora_scale is not None:
            sd[f"{base}.dora_scale"] = module.dora_scale.contiguous()

    plain = [m for m in lora.modules.values() if isinstance(m, LoraModule)]
    linear = [m for m in plain if not (m.down.ndim == 4 and m.down.shape[-1] > 1)]
    convs = [m for m in plain if m.down.ndim == 4 and m.down.shape[-1] > 1]
    kinds = sorted({m.kind for m in lora.modules.values()} - {"lora"})
    rank = _most_common([m.rank for m in linear], _most_common([m.rank for m in convs], 0))
    alpha = _most_common([_alpha(m) for m in linear], _most_common([_alpha(m) for m in convs], 0.0))
    ranked = [m for m in lora.modules.values() if getattr(m, "rank", 0)]  # LoHa, LoKr with a decomposed factor
    if not plain and ranked:  # a LyCORIS file's dim and alpha are its modules' (alpha None: alpha = rank)
        rank = _most_common([m.rank for m in ranked], 0)
        alpha = _most_common([float(m.alpha) if m.alpha else float(m.rank) for m in ranked], 0.0)
    elif not plain:  # e.g. a LoKr with both factors full: no rank; keep the dim/alpha its trainer recorded
        try:
            rank, alpha = int(lora.metadata["ss_network_dim"]), float(lora.metadata["ss_network_alpha"])
        except (KeyError, ValueError):
            pass
    v = info(family).v_default if v_prediction is None else bool(v_prediction)
    meta = {k: v_ for k, v_ in lora.metadata.items() if k not in _STALE_METADATA}
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": modelspec(family, v).kohya_version,
        "ss_v2": str(family is Family.SD2),
        **modelspec_keys(family, "lora", v),
        "modelspec.title": lora.name or f"LoRA@{int(time.time())}",
    })
    args: dict[str, str] = {}
    if convs:
        args.update(conv_dim=str(_most_common([m.rank for m in convs], 0)),
                    conv_alpha=_num(_most_common([_alpha(m) for m in convs], 0.0)))
    algos = [_LYCORIS_ALGOS[k] for k in kinds if k in _LYCORIS_ALGOS]
    dora = any(getattr(m, "dora_scale", None) is not None for m in lora.modules.values())
    if algos or dora:  # LyCORIS' own network module, algorithm name and DoRA flag
        meta["ss_network_module"] = "lycoris.kohya"
        args["algo"] = "+".join(algos) or "lora"
    if dora:
        args["dora_wd"] = "True"
    if args:
        meta["ss_network_args"] = json.dumps(args)
    elif _dora_claim(meta):  # arguments inherited from a DoRA file, for modules without magnitudes
        meta.pop("ss_network_args")
    if v:
        meta["modelspec.prediction_type"] = "v"
    if bundle and lora.embeddings:
        sd.update(bundle_state(lora.embeddings))
    return sd, meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _peft_lokr_factors(where: str, module: adapters.LokrModule) -> tuple[dict[str, Tensor], int]:
    """``module`` as the tensors peft's LoKr layer holds (``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a``/``_b``) with its
    scale folded into ``lokr_w1``, and the rank that makes peft build these factors.

    peft's ``LoKrConfig(decompose_factor=-1, decompose_both=False, use_effective_conv2d=False)`` splits the output
    width into ``(a, b)`` and the input width into ``(c, d)`` with ``peft.tuners.lokr.layer.factorization`` (the
    divisor pair nearest the square root, smaller first), keeps ``w1 [a, c]`` full and decomposes ``w2 [b, d]`` (a
    conv's ``[b, d * k * k]``) into ``w2_a [b, r] @ w2_b [r, ...]`` when ``r < max(b, d) / 2``, else keeps it full
    (``[b, d, k, k]`` for a conv). Factors made otherwise (LyCORIS' ``factor``, CP, a decomposed ``w1``) raise.
    """
    from peft.tuners.lokr.layer import factorization  # noqa: PLC0415 - heavy, and only this writer needs it

    refuse = f"{where}: this LoKr's factors are not the ones peft's LoKrConfig builds ({{}}); write kohya"
    if module.w1 is None or module.t2 is not None or module.bias is not None \
            or getattr(module, "dora_scale", None) is not None:
        raise ValueError(refuse.format("a decomposed lokr_w1, a CP lokr_t2, a diff_b or a dora_scale"))
    a, c = (int(n) for n in module.w1.shape[:2])
    tensors = {"lokr_w1": (module.w1.float() * module.scale).contiguous()}
    if module.w2 is not None:
        b, d = (int(n) for n in module.w2.shape[:2])
        rank = max(b, d)  # any rank >= max(b, d) / 2 makes peft keep w2 full
        tensors["lokr_w2"] = module.w2.contiguous()
    else:
        b, rank = (int(n) for n in module.w2_a.shape)
        inner = int(module.w2_b.shape[-1])  # d, or d * k * k for a conv (the kernel is not in the factors)
        fits = [inner // kk for kk in (1, 4, 9, 25, 49) if inner % kk == 0
                and factorization(c * (inner // kk)) == (c, inner // kk)]
        if not fits or not rank < max(b, fits[0]) / 2:
            raise ValueError(refuse.format(f"w2_b {list(module.w2_b.shape)} beside w1 {[a, c]}"))
        d = fits[0]
        tensors.update(lokr_w2_a=module.w2_a.contiguous(), lokr_w2_b=module.w2_b.contiguous())
    if factorization(a * b) != (a, b) or factorization(c * d) != (c, d):
        raise ValueError(refuse.format(f"w1 {[a, c]} and w2 {[b, d]}"))
    return tensors, rank


def _peft_lokr_state_dict(lora: LoraWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A UNet LoKr in peft's layout, which diffusers' ``unet.load_lora_adapter(file, prefix="unet")`` loads.

    Keys ``unet.<path>.lokr_w1`` / ``.lokr_w2`` or ``.lokr_w2_a`` / ``.lokr_w2_b`` (peft's parameter names); the
    metadata's ``lora_adapter_metadata`` holds the ``LoKrConfig`` (``unet.r``, ``unet.alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``target_modules``, the factorisation settings) diffusers builds the adapter from, with
    ``alpha = r`` for every module (peft's scale ``alpha / r`` is then 1: the scale is in ``lokr_w1``). diffusers'
    pipeline ``load_lora_weights`` refuses such keys (it wants "lora" in each) and its text-encoder loader builds
    LoRA layers only, so a LoKr with text-encoder modules, or mixed with other kinds, raises.
    """
    sd: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for (comp, path), module in sorted(lora.modules.items()):
        if comp != "unet":
            raise ValueError(f"{comp}:{path}: diffusers loads a LoKr into the UNet only (its text-encoder loader "
                             "makes LoRA layers); write kohya, or train the LoKr without the text encoder")
        if not isinstance(module, adapters.LokrModule):
            raise ValueError(f"{comp}:{path}: a {module.kind} module beside LoKr modules has no diffusers form "
                             "(diffusers reads a file as all LoKr or all LoRA); write kohya")
        tensors, ranks[path] = _peft_lokr_factors(f"{comp}:{path}", module)
        sd.update({f"unet.{path}.{part}": t for part, t in tensors.items()})
    r = _most_common(list(ranks.values()), 1)
    pattern = {p: n for p, n in ranks.items() if n != r}
    config = {"r": r, "alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "decompose_both": False, "decompose_factor": -1,
              "use_effective_conv2d": False}
    adapter = {f"unet.{k}": v for k, v in config.items()}
    return sd, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)}


def to_diffusers_state_dict(lora: LoraWeights, *, family: Family,
                            unet_config: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Write the PEFT layout diffusers' ``load_lora_weights`` reads, with ``lora_adapter_metadata``.

    Keys ``unet.<path>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.text_model.<path>...`` and
    ``text_encoder_2.`` for SDXL's bigG. The metadata JSON holds each component's ``r``, ``lora_alpha``,
    ``target_modules`` and ``rank_pattern``/``alpha_pattern`` for modules that differ, so alphas survive
    (diffusers files otherwise have none). Tucker (``lora_mid``) modules cannot be expressed and raise.
    A LoKr is written in peft's LoKr layout (:func:`_peft_lokr_state_dict`); LoHa has no diffusers loader and raises.
    """
    family = Family(family)
    if any(isinstance(m, adapters.LokrModule) for m in lora.modules.values()):
        return _peft_lokr_state_dict(lora)
    sd: dict[str, Tensor] = {}
    per_comp: dict[str, list[tuple[str, LoraModule]]] = {}
    for (comp, path), module in sorted(lora.modules.items()):
        if not isinstance(module, LoraModule):
            raise ValueError(f"{comp}:{path}: a {module.kind} module has no diffusers/PEFT LoRA form; write kohya")
        if module.dora_scale is not None:  # PEFT's magnitudes (lora_magnitude_vector) are not written here
            raise ValueError(f"{comp}:{path}: a DoRA module (dora_scale) has no diffusers/PEFT form here; write "
                             "kohya")
        if module.mid is not None:
            raise ValueError(f"{comp}:{path}: LyCORIS Tucker (lora_mid) has no diffusers/PEFT form; write kohya")
        if comp == "te2" and family is not Family.SDXL:
            raise ValueError(f"{family.label} has one text encoder; got a module for te2")
        name = path if comp == "unet" else canonical_te_path(path)
        base = f"{_DIFFUSERS_COMPONENT[comp]}.{name}"
        sd[f"{base}.lora_A.weight"] = module.down.contiguous()
        sd[f"{base}.lora_B.weight"] = module.up.contiguous()
        per_comp.setdefault(comp, []).append((path if comp == "unet" else te_target_name(path), module))
    adapter: dict[str, Any] = {}
    for comp, items in per_comp.items():
        r = _most_common([m.rank for _, m in items], 1)
        alpha = _most_common([_alpha(m) for _, m in items], float(r))
        prefix = _DIFFUSERS_COMPONENT[comp]
        adapter[f"{prefix}.r"] = r
        adapter[f"{prefix}.lora_alpha"] = alpha
        adapter[f"{prefix}.target_modules"] = sorted(t for t, _ in items)
        adapter[f"{prefix}.rank_pattern"] = {t: m.rank for t, m in items if m.rank != r}
        adapter[f"{prefix}.alpha_pattern"] = {t: _alpha(m) for t, m in items if _alpha(m) != alpha}
    meta = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)}
    return sd, meta
