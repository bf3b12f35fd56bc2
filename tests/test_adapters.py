"""LyCORIS LoHa / LoKr and full differences in LoRA files: Add LoRA applies each with the formula its format defines.

The expected weights come from small independent implementations written from the definitions (float64 loops and
explicit block construction, no shared code with core/adapters.py), on the tiny SD 1.x UNet."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.core.lora_handle import lora_for_handle
from comfy_finetune.nodes import NODE_CLASS_MAPPINGS as N
from comfy_finetune.training.saving import save_lora

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # [32, 32]
CONV = "down_blocks.1.resnets.0.conv1"                                 # [64, 32, 3, 3]
WIDE = "up_blocks.1.resnets.0.conv1"                                   # [32, 96, 3, 3]
NORM = "conv_norm_out"                                                 # GroupNorm(32): weight and bias


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


# ---------------------------------------------------------------------------------------------- the definitions
def matmul(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.zeros((a.shape[0], b.shape[1]))
    for i, j in itertools.product(range(a.shape[0]), range(b.shape[1])):
        out[i, j] = sum(a[i, r] * b[r, j] for r in range(a.shape[1]))
    return out


def cp(t, w_b, w_a):
    """CP factor of LyCORIS: out[p, r, k, l] = sum_ij t[i, j, k, l] w_b[j, r] w_a[i, p]."""
    t, w_b, w_a = (np.asarray(x, np.float64) for x in (t, w_b, w_a))
    out = np.zeros((w_a.shape[1], w_b.shape[1], *t.shape[2:]))
    for i, j in itertools.product(range(t.shape[0]), range(t.shape[1])):
        out += t[i, j][None, None] * np.outer(w_a[i], w_b[j])[:, :, None, None]
    return out


def kron(a, b):
    """Kronecker product by blocks: block (i, j) is a[i, j] * b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.zeros((a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:]))
    for i, j in itertools.product(range(a.shape[0]), range(a.shape[1])):
        out[i * b.shape[0]:(i + 1) * b.shape[0], j * b.shape[1]:(j + 1) * b.shape[1]] = a[i, j] * b
    return out


# ---------------------------------------------------------------------------------------------- files
def loha_file(cp_conv: bool):
    """LoHa on the Linear (rank 4, alpha 2) and on the 3x3 conv (rank 3, alpha 6; CP factors or flat)."""
    sd, expected = {}, {}
    a1, b1, a2, b2 = rand(32, 4, seed=1), rand(4, 32, seed=2), rand(32, 4, seed=3), rand(4, 32, seed=4)
    sd |= {f"{kohya(LINEAR)}.hada_w1_a": a1, f"{kohya(LINEAR)}.hada_w1_b": b1, f"{kohya(LINEAR)}.hada_w2_a": a2,
           f"{kohya(LINEAR)}.hada_w2_b": b2, f"{kohya(LINEAR)}.alpha": torch.tensor(2.0)}
    expected[LINEAR] = matmul(a1, b1) * matmul(a2, b2) * (2.0 / 4)
    if cp_conv:  # LyCORIS stores w_a [rank, out], w_b [rank, in], t [rank, rank, k, k]
        a1, b1, a2, b2 = rand(3, 64, seed=5), rand(3, 32, seed=6), rand(3, 64, seed=7), rand(3, 32, seed=8)
        t1, t2 = rand(3, 3, 3, 3, seed=9), rand(3, 3, 3, 3, seed=10)
        sd |= {f"{kohya(CONV)}.hada_t1": t1, f"{kohya(CONV)}.hada_t2": t2}
        delta = cp(t1, b1, a1) * cp(t2, b2, a2)
    else:
        a1, b1, a2, b2 = rand(64, 3, seed=5), rand(3, 288, seed=6), rand(64, 3, seed=7), rand(3, 288, seed=8)
        delta = (matmul(a1, b1) * matmul(a2, b2)).reshape(64, 32, 3, 3)
    sd |= {f"{kohya(CONV)}.hada_w1_a": a1, f"{kohya(CONV)}.hada_w1_b": b1, f"{kohya(CONV)}.hada_w2_a": a2,
           f"{kohya(CONV)}.hada_w2_b": b2, f"{kohya(CONV)}.alpha": torch.tensor(6.0)}
    expected[CONV] = delta * (6.0 / 3)
    return sd, expected


def lokr_file(variant: str):
    """LoKr: w1 full [4, 4] with w2 decomposed (rank 2, alpha 1) on the Linear; on the conv either both full (alpha
    ignored), w1 decomposed with w2 full, or w2 CP-decomposed (lokr_t2)."""
    sd, expected = {}, {}
    w1, w2a, w2b = rand(4, 4, seed=11), rand(8, 2, seed=12), rand(2, 8, seed=13)
    sd |= {f"{kohya(LINEAR)}.lokr_w1": w1, f"{kohya(LINEAR)}.lokr_w2_a": w2a, f"{kohya(LINEAR)}.lokr_w2_b": w2b,
           f"{kohya(LINEAR)}.alpha": torch.tensor(1.0)}
    expected[LINEAR] = kron(w1, matmul(w2a, w2b)) * (1.0 / 2)
    base = kohya(CONV)
    if variant == "full":
        w1, w2 = rand(8, 4, seed=14), rand(8, 8, 3, 3, seed=15)
        sd |= {f"{base}.lokr_w1": w1, f"{base}.lokr_w2": w2, f"{base}.alpha": torch.tensor(5.0)}
        expected[CONV] = kron(np.asarray(w1)[:, :, None, None], w2)
    elif variant == "w1-decomposed":
        w1a, w1b, w2 = rand(8, 2, seed=16), rand(2, 4, seed=17), rand(8, 8, 3, 3, seed=18)
        sd |= {f"{base}.lokr_w1_a": w1a, f"{base}.lokr_w1_b": w1b, f"{base}.lokr_w2": w2,
               f"{base}.alpha": torch.tensor(3.0)}
        expected[CONV] = kron(matmul(w1a, w1b)[:, :, None, None], w2) * (3.0 / 2)
    else:  # lokr_t2: w2 = cp(t2, w2_b, w2_a), rank 3
        w1, w2a, w2b, t2 = rand(8, 4, seed=19), rand(3, 8, seed=20), rand(3, 8, seed=21), rand(3, 3, 3, 3, seed=22)
        sd |= {f"{base}.lokr_w1": w1, f"{base}.lokr_w2_a": w2a, f"{base}.lokr_w2_b": w2b, f"{base}.lokr_t2": t2,
               f"{base}.alpha": torch.tensor(1.5)}
        expected[CONV] = kron(np.asarray(w1)[:, :, None, None], cp(t2, w2b, w2a)) * (1.5 / 3)
    return sd, expected


def diff_file():
    """ComfyUI's trainer's full differences: a GroupNorm weight and bias, and a whole conv weight."""
    d, db, dc = rand(32, seed=23), rand(32, seed=24), rand(32, 96, 3, 3, seed=25)
    sd = {f"{kohya(NORM)}.diff": d, f"{kohya(NORM)}.diff_b": db, f"{kohya(WIDE)}.diff": dc}
    return sd, {NORM: d.double().numpy(), WIDE: dc.double().numpy()}, {NORM: db.double().numpy()}


CASES = {"loha": lambda: loha_file(False), "loha-cp": lambda: loha_file(True), "lokr-full": lambda: lokr_file("full"),
         "lokr-w1-decomposed": lambda: lokr_file("w1-decomposed"), "lokr-t2": lambda: lokr_file("t2")}


@pytest.fixture
def sd1(tiny_handles):
    return tiny_handles["sd1"]


def _load(sd, handle, tmp_path, name="adapter"):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return lora_for_handle(path, handle)


def _check(handle, weights, strength, expected, expected_bias=None):
    unet = handle.base.unet
    before = {n: p.detach().double().clone() for n, p in unet.named_parameters()}
    with handle.with_patch(LoraPatch(weights, strength, 1.0)).patched():
        after = {n: p.detach().double().clone() for n, p in unet.named_parameters()}
    for name, value in after.items():
        module, _, kind = name.rpartition(".")
        table = expected if kind == "weight" else (expected_bias or {})
        want = before[name].numpy() + (strength * table[module] if module in table else 0.0)
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert all(torch.equal(p.detach().double(), before[n]) for n, p in unet.named_parameters())  # restored


@pytest.mark.parametrize("case", list(CASES))
def test_loha_and_lokr_apply_their_defined_deltas(sd1, tmp_path, case):
    sd, expected = CASES[case]()
    weights, unmatched = _load(sd, sd1, tmp_path)
    assert unmatched == [] and {p for _, p in weights.modules} == set(expected)
    _check(sd1, weights, 0.7, expected)


def test_full_weight_and_bias_differences_apply_scaled_by_strength(sd1, tmp_path):
    sd, expected, bias = diff_file()
    weights, unmatched = _load(sd, sd1, tmp_path)
    assert unmatched == []
    _check(sd1, weights, 0.5, expected, bias)


def test_a_mixed_file_sums_every_kind_on_one_layer_set(sd1, tmp_path):
    """One file with a LoHa on the Linear, a LoKr on the conv and the norm's differences, chained after a plain LoRA
    patch on the same Linear: the deltas add up."""
    loha, e_loha = loha_file(False)
    lokr, e_lokr = lokr_file("full")
    diffs, e_diff, e_bias = diff_file()
    mixed = {k: v for k, v in loha.items() if LINEAR.replace(".", "_") in k}
    mixed |= {k: v for k, v in lokr.items() if CONV.replace(".", "_") in k}
    mixed |= diffs
    weights, unmatched = _load(mixed, sd1, tmp_path)
    assert unmatched == []
    _check(sd1, weights, 1.0, {LINEAR: e_loha[LINEAR], CONV: e_lokr[CONV], **e_diff}, e_bias)


@pytest.mark.parametrize("case", [*CASES, "diff"])
def test_save_lora_writes_loaded_adapters_back_unchanged(sd1, tmp_path, case):
    sd = diff_file()[0] if case == "diff" else CASES[case]()[0]
    weights, _ = _load(sd, sd1, tmp_path)
    out = save_lora(weights, tmp_path / "again.safetensors", family=sd1.family,
                    unet_config=dict(sd1.base.unet.config))
    again = load_file(str(out))
    assert again.keys() == sd.keys()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    with pytest.raises(FinetuneError, match="no diffusers/PEFT LoRA form.*Fix: save it in the kohya layout"):
        save_lora(weights, tmp_path / "peft.safetensors", family=sd1.family, unet_config=dict(sd1.base.unet.config),
                  layout="diffusers")


def test_add_lora_applies_a_lokr_file_and_lists_nothing_unapplied(sd1, models_dir):
    sd, _ = lokr_file("t2")
    path = models_dir / "loras" / "adapters-test-lokr.safetensors"
    save_file(sd, str(path))
    try:
        out = N["AddLoRA"]().run(pipe=sd1, lora_name=path.name, strength_unet=1.0, strength_text=1.0)
        patched = out["result"][0] if isinstance(out, dict) else out[0]
        assert len(patched.patches) == 1 and {m.kind for m in patched.patches[0].lora.modules.values()} == {"lokr"}
        notes = out.get("ui", {}).get("text", []) if isinstance(out, dict) else []
        assert not any("not applied" in n for n in notes), notes
    finally:
        path.unlink(missing_ok=True)


def test_inconsistent_lokr_factors_are_a_clear_error_and_the_next_load_works(sd1, models_dir):
    sd, _ = lokr_file("w1-decomposed")
    sd[f"{kohya(CONV)}.lokr_w1_b"] = rand(5, 4, seed=30)  # inner size 5 vs lokr_w1_a's 2
    loras = models_dir / "loras"
    bad, good = loras / "adapters-test-bad.safetensors", loras / "adapters-test-ok.safetensors"
    save_file(sd, str(bad))
    save_file(lokr_file("full")[0], str(good))
    try:
        with pytest.raises(FinetuneError, match=r"\[AddLoRA\] input 'lora_name': module '.*conv1' cannot be "
                                                r"read: LoKr lokr_w1_a \[8, 2\] and lokr_w1_b \[5, 4\] do not "
                                                r"multiply.*Fix:"):
            N["AddLoRA"]().run(pipe=sd1, lora_name=bad.name, strength_unet=1.0, strength_text=1.0)
        N["AddLoRA"]().run(pipe=sd1, lora_name=good.name, strength_unet=1.0, strength_text=1.0)
    finally:
        bad.unlink(missing_ok=True)
        good.unlink(missing_ok=True)


def test_dora_magnitudes_are_listed_as_not_applied(sd1, tmp_path):
    """DoRA is not applied yet: its LoRA part loads and the magnitude keys are reported, never dropped silently."""
    name = kohya(LINEAR)
    sd = {f"{name}.lora_down.weight": rand(4, 32, seed=40), f"{name}.lora_up.weight": rand(32, 4, seed=41),
          f"{name}.dora_scale": rand(32, 1, seed=42)}
    weights, unmatched = _load(sd, sd1, tmp_path)
    assert unmatched == [f"{name}.dora_scale"] and len(weights.modules) == 1


def test_a_bias_difference_beside_low_rank_factors_applies_and_a_full_diff_there_is_listed(sd1, tmp_path):
    """ComfyUI's trainer writes a layer's LoRA and its bias difference under one name: both apply. A full .diff
    beside low-rank factors has no meaning for this pack's modules and is reported, not dropped."""
    conv = kohya(CONV)
    down, up, bias = rand(2, 32, 3, 3, seed=60), rand(64, 2, 1, 1, seed=61), rand(64, seed=62)
    sd = {f"{conv}.lora_down.weight": down, f"{conv}.lora_up.weight": up, f"{conv}.alpha": torch.tensor(1.0),
          f"{conv}.diff_b": bias, f"{conv}.diff": rand(64, 32, 3, 3, seed=63)}
    weights, unmatched = _load(sd, sd1, tmp_path)
    assert unmatched == [f"{conv}.diff"]
    delta = (matmul(up.flatten(1), down.flatten(1)) * (1.0 / 2)).reshape(64, 32, 3, 3)
    _check(sd1, weights, 0.8, {CONV: delta}, {CONV: bias.double().numpy()})
    again = load_file(str(save_lora(weights, tmp_path / "again.safetensors", family=sd1.family,
                                    unet_config=dict(sd1.base.unet.config))))
    assert torch.equal(again[f"{conv}.diff_b"], bias)
