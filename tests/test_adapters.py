"""LyCORIS LoHa / LoKr / OFT / BOFT, DoRA magnitudes, full differences and replacement weights in LoRA files: Add
LoRA applies each with the formula ComfyUI's loader applies (``comfy/weight_adapter/*.py``).

The expected weights come from small independent implementations written from the definitions (float64 loops,
explicit block and permutation matrices, no shared code with core/adapters.py), on the tiny SD 1.x UNet."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family
from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.core.lora import parse_lora
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
    if not case.startswith("lokr"):  # (a LoKr's diffusers/PEFT form is the LoKr writer's, tested with it)
        with pytest.raises(FinetuneError, match="no diffusers/PEFT .*form.*Fix: save it in the kohya layout"):
            save_lora(weights, tmp_path / "peft.safetensors", family=sd1.family,
                      unet_config=dict(sd1.base.unet.config), layout="diffusers")


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


# ---------------------------------------------------------------------------------------------- weight-dependent kinds
# Each file builder returns (state dict, expect) with expect(base, strength) -> {parameter name: new value (float64)}
# for the parameters the file changes; base maps parameter names to the weights before the patch.
EPS32 = float(np.finfo(np.float32).eps)


def f64(t):
    return np.asarray(t.detach().double() if isinstance(t, torch.Tensor) else t, np.float64)


def row_norms(w):
    return np.array([np.sqrt(sum(x * x for x in w[o].ravel())) for o in range(w.shape[0])])


def col_norms(w):
    return np.array([np.sqrt(sum(x * x for x in w[:, i].ravel())) for i in range(w.shape[1])])


def dora_rows(w, d, m, strength):
    w, d, m = f64(w), f64(d).reshape(np.shape(w)), f64(m).ravel()
    v, n = w + d, row_norms(w)
    merged = np.stack([v[o] * (m[o] / (n[o] + EPS32)) for o in range(w.shape[0])])
    return merged if strength == 1.0 else w + strength * (merged - w)


def dora_cols(w, d, m, strength):
    w, d, m = f64(w), f64(d).reshape(np.shape(w)), f64(m).ravel()
    v = w + d
    n = col_norms(v)
    merged = np.stack([v[:, i] * (m[i] / (n[i] + EPS32)) for i in range(w.shape[1])], axis=1)
    return merged if strength == 1.0 else w + strength * (merged - w)


def magnitudes(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.5


def dora_lora_file():
    """DoRA on a LoRA (Linear, rank 4, alpha 2, magnitudes per output row [32, 1]) and on a kohya LoCon (3x3 conv,
    rank 2, alpha 3, magnitudes per input column [1, 32, 1, 1])."""
    lin, conv = kohya(LINEAR), kohya(CONV)
    down, up, m = rand(4, 32, seed=70), rand(32, 4, seed=71), magnitudes(32, 1, seed=72)
    cdown, cup, cm = rand(2, 32, 3, 3, seed=73), rand(64, 2, 1, 1, seed=74), magnitudes(1, 32, 1, 1, seed=75)
    sd = {f"{lin}.lora_down.weight": down, f"{lin}.lora_up.weight": up, f"{lin}.alpha": torch.tensor(2.0),
          f"{lin}.dora_scale": m, f"{conv}.lora_down.weight": cdown, f"{conv}.lora_up.weight": cup,
          f"{conv}.alpha": torch.tensor(3.0), f"{conv}.dora_scale": cm}
    d_lin = matmul(up, down) * (2.0 / 4)
    d_conv = (matmul(cup.flatten(1), cdown.flatten(1)) * (3.0 / 2)).reshape(64, 32, 3, 3)

    def expect(base, s):
        return {f"{LINEAR}.weight": dora_rows(base[f"{LINEAR}.weight"], d_lin, m, s),
                f"{CONV}.weight": dora_cols(base[f"{CONV}.weight"], d_conv, cm, s)}
    return sd, expect


def dora_loha_file():
    """DoRA on a LoHa (Linear, rank 4, alpha 2) with magnitudes per input column [1, 32]."""
    sd, e = loha_file(False)
    sd = {k: v for k, v in sd.items() if k.startswith(kohya(LINEAR))}
    m = magnitudes(1, 32, seed=76)
    sd[f"{kohya(LINEAR)}.dora_scale"] = m
    return sd, lambda base, s: {f"{LINEAR}.weight": dora_cols(base[f"{LINEAR}.weight"], e[LINEAR], m, s)}


def dora_lokr_file():
    """DoRA on a LoKr (3x3 conv, both factors full: scale 1) with magnitudes per output row [64, 1, 1, 1]."""
    sd, e = lokr_file("full")
    sd = {k: v for k, v in sd.items() if k.startswith(kohya(CONV))}
    m = magnitudes(64, 1, 1, 1, seed=77)
    sd[f"{kohya(CONV)}.dora_scale"] = m
    return sd, lambda base, s: {f"{CONV}.weight": dora_rows(base[f"{CONV}.weight"], e[CONV], m, s)}


def cayley(blocks, alpha):
    """R = (I + Q)(I - Q)^-1 per block, Q = B - B^T scaled to Frobenius norm alpha (over all blocks, + 1e-8) when
    larger and alpha > 0."""
    b = f64(blocks)
    q = b - np.swapaxes(b, -1, -2)
    norm = np.sqrt((q * q).sum()) + 1e-8
    if alpha and norm > alpha:
        q = q * (alpha / norm)
    eye = np.eye(b.shape[-1])
    flat = q.reshape(-1, *q.shape[-2:])
    return np.stack([(eye + x) @ np.linalg.inv(eye - x) for x in flat]).reshape(q.shape)


def oft(w, r, strength):
    """OFT as ComfyUI applies it: output rows in groups of b, each group rotated by R^T; the strength scales the
    rotation's difference and the result again: W + s^2 (R^T W - W) per group."""
    w = f64(w)
    k, b = r.shape[:2]
    out = w.copy()
    for g, j in itertools.product(range(k), range(b)):
        rotated = sum(r[g, n, j] * w[g * b + n] for n in range(b))
        out[g * b + j] = w[g * b + j] + strength * strength * (rotated - w[g * b + j])
    return out


def boft(w, r, strength, rescale=None):
    """BOFT as ComfyUI applies it, with explicit matrices: stage i is P_i^T D_i P_i where P_i sends row
    a*2h + j*h + c to a*2h + c*2 + j (h = 2^i * b/2) and D_i is block-diagonal in the stage's blocks (blended
    s R + (1 - s) I); then each row times rescale; W' = W + s (V - W)."""
    w = f64(w)
    n_rows = w.shape[0]
    stages, k, b = r.shape[:3]
    x = w.reshape(n_rows, -1)
    for i in range(stages):
        h = 2 ** i * (b // 2)
        perm = np.zeros((n_rows, n_rows))
        for n in range(n_rows):
            a, rem = divmod(n, 2 * h)
            j, c = divmod(rem, h)
            perm[a * 2 * h + c * 2 + j, n] = 1.0
        diag = np.zeros((n_rows, n_rows))
        for g in range(k):
            diag[g * b:(g + 1) * b, g * b:(g + 1) * b] = strength * r[i, g] + (1 - strength) * np.eye(b)
        x = perm.T @ diag @ perm @ x
    if rescale is not None:
        x = x * f64(rescale).reshape(n_rows, 1)
    return w + strength * (x.reshape(w.shape) - w)


def oft_file(variant):
    """OFT: on the Linear [32, 32] blocks [4, 8, 8] without alpha and with a rescale (which ComfyUI does not
    apply: listed); on the conv [64, ...] blocks [8, 8, 8] with alpha 0.05, below the blocks' norm (constrained)."""
    if variant == "linear":
        blocks, rescale = rand(4, 8, 8, seed=80), magnitudes(32, 1, seed=81)
        sd = {f"{kohya(LINEAR)}.oft_blocks": blocks, f"{kohya(LINEAR)}.rescale": rescale}
        r = cayley(blocks, None)
        return sd, lambda base, s: {f"{LINEAR}.weight": oft(base[f"{LINEAR}.weight"], r, s)}
    blocks = rand(8, 8, 8, seed=82)
    sd = {f"{kohya(CONV)}.oft_blocks": blocks, f"{kohya(CONV)}.alpha": torch.tensor(0.05)}
    r = cayley(blocks, 0.05)
    return sd, lambda base, s: {f"{CONV}.weight": oft(base[f"{CONV}.weight"], r, s)}


def boft_file(variant):
    """BOFT: on the Linear blocks [3, 8, 4, 4] (3 stages of 8 blocks of 4) with alpha 10 (not reached) and a
    rescale [32, 1]; on the conv blocks [2, 8, 8, 8] with alpha 0.5 (constrained); or the Linear without alpha."""
    if variant == "conv":
        blocks = rand(2, 8, 8, 8, seed=85)
        sd = {f"{kohya(CONV)}.oft_blocks": blocks, f"{kohya(CONV)}.alpha": torch.tensor(0.5)}
        r = cayley(blocks, 0.5)
        return sd, lambda base, s: {f"{CONV}.weight": boft(base[f"{CONV}.weight"], r, s)}
    blocks, rescale = rand(3, 8, 4, 4, seed=83), magnitudes(32, 1, seed=84)
    sd = {f"{kohya(LINEAR)}.oft_blocks": blocks, f"{kohya(LINEAR)}.rescale": rescale}
    if variant == "linear":
        sd[f"{kohya(LINEAR)}.alpha"] = torch.tensor(10.0)
    r = cayley(blocks, 10.0 if variant == "linear" else None)
    return sd, lambda base, s: {f"{LINEAR}.weight": boft(base[f"{LINEAR}.weight"], r, s, rescale)}


def set_file():
    """A replacement weight with a bias difference on the conv, and LyCORIS norm differences (w_norm, b_norm)."""
    new, db = rand(64, 32, 3, 3, seed=90), rand(64, seed=91)
    wn, bn = rand(32, seed=92), rand(32, seed=93)
    sd = {f"{kohya(CONV)}.set_weight": new, f"{kohya(CONV)}.diff_b": db, f"{kohya(NORM)}.w_norm": wn,
          f"{kohya(NORM)}.b_norm": bn}

    def expect(base, s):  # the replacement ignores the strength (ComfyUI's "set" patch)
        return {f"{CONV}.weight": f64(new), f"{CONV}.bias": f64(base[f"{CONV}.bias"]) + s * f64(db),
                f"{NORM}.weight": f64(base[f"{NORM}.weight"]) + s * f64(wn),
                f"{NORM}.bias": f64(base[f"{NORM}.bias"]) + s * f64(bn)}
    return sd, expect


WEIGHT_DEPENDENT = {"dora-lora": dora_lora_file, "dora-loha": dora_loha_file, "dora-lokr": dora_lokr_file,
                    "oft": lambda: oft_file("linear"), "oft-alpha": lambda: oft_file("conv"),
                    "boft": lambda: boft_file("linear"), "boft-alpha": lambda: boft_file("conv"),
                    "boft-no-alpha": lambda: boft_file("no-alpha"), "set+norm": set_file}
#: keys ComfyUI reads but does not apply, which Add LoRA lists as not applied
NOT_APPLIED = {"oft": [f"{kohya(LINEAR)}.rescale"]}


def _check_patched(handle, patches, expect):
    """Apply ``patches`` [(weights, strength)] in order; every parameter equals ``expect`` (or is unchanged) during
    the block and is restored bit for bit after."""
    unet = handle.base.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    patched = handle
    for weights, strength in patches:
        patched = patched.with_patch(LoraPatch(weights, strength, 1.0))
    with patched.patched():
        after = {n: p.detach().double().clone() for n, p in unet.named_parameters()}
    for name, value in after.items():
        want = expect.get(name, f64(before[name]))
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())  # restored exactly
    return after, before


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("case", list(WEIGHT_DEPENDENT))
def test_weight_dependent_kinds_give_comfyuis_weights(sd1, tmp_path, case, strength):
    sd, expect = WEIGHT_DEPENDENT[case]()
    weights, unmatched = _load(sd, sd1, tmp_path)
    assert unmatched == NOT_APPLIED.get(case, [])
    base = {n: p.detach() for n, p in sd1.base.unet.named_parameters()}
    after, before = _check_patched(sd1, [(weights, strength)], expect(base, strength))
    changed = {n for n in after if not np.array_equal(after[n].numpy(), f64(before[n]))}
    assert changed == set(expect(base, strength))  # each case changes what it says (no vacuous pass)


def test_dora_after_a_lora_sees_the_weight_the_lora_left_and_the_order_counts(sd1, tmp_path):
    """A DoRA patch normalises the weight the earlier patches left (ComfyUI applies patches in order); a plain
    LoRA after it just adds."""
    lora_sd = plain_lora_file()
    plain, _ = _load(lora_sd, sd1, tmp_path, "plain")
    dora_sd, _ = dora_lora_file()
    dora_weights, _ = _load(dora_sd, sd1, tmp_path, "dora")
    w, wc = (f64(sd1.base.unet.get_submodule(p).weight) for p in (LINEAR, CONV))
    d_plain = matmul(lora_sd[f"{kohya(LINEAR)}.lora_up.weight"], lora_sd[f"{kohya(LINEAR)}.lora_down.weight"]) * 0.5
    lin, conv = kohya(LINEAR), kohya(CONV)
    d_dora = matmul(dora_sd[f"{lin}.lora_up.weight"], dora_sd[f"{lin}.lora_down.weight"]) * 0.5
    d_conv = (matmul(dora_sd[f"{conv}.lora_up.weight"].flatten(1), dora_sd[f"{conv}.lora_down.weight"].flatten(1))
              * 1.5).reshape(64, 32, 3, 3)
    m, cm = dora_sd[f"{lin}.dora_scale"], dora_sd[f"{conv}.dora_scale"]
    first = {f"{LINEAR}.weight": dora_rows(w + 0.8 * d_plain, d_dora, m, 0.5),
             f"{CONV}.weight": dora_cols(wc, d_conv, cm, 0.5)}
    _check_patched(sd1, [(plain, 0.8), (dora_weights, 0.5)], first)
    second = {f"{LINEAR}.weight": dora_rows(w, d_dora, m, 0.5) + 0.8 * d_plain,
              f"{CONV}.weight": dora_cols(wc, d_conv, cm, 0.5)}
    _check_patched(sd1, [(dora_weights, 0.5), (plain, 0.8)], second)
    assert np.abs(first[f"{LINEAR}.weight"] - second[f"{LINEAR}.weight"]).max() > 1e-4  # the order shows


def plain_lora_file():
    """A plain LoRA on the Linear (rank 4, alpha 2)."""
    name = kohya(LINEAR)
    return {f"{name}.lora_down.weight": rand(4, 32, seed=40), f"{name}.lora_up.weight": rand(32, 4, seed=41),
            f"{name}.alpha": torch.tensor(2.0)}


def test_a_set_weight_replaces_what_earlier_patches_did_and_strength_zero_leaves_it(sd1, tmp_path):
    plain, _ = _load(plain_lora_file(), sd1, tmp_path, "plain")
    new = rand(32, 32, seed=95)
    replaced, unmatched = _load({f"{kohya(LINEAR)}.set_weight": new}, sd1, tmp_path, "set")
    assert unmatched == [] and {m.kind for m in replaced.modules.values()} == {"set"}
    _check_patched(sd1, [(plain, 1.0), (replaced, 0.3)], {f"{LINEAR}.weight": f64(new)})
    _check_patched(sd1, [(plain, 1.0), (replaced, 0.0)],
                   {f"{LINEAR}.weight": f64(sd1.base.unet.get_submodule(LINEAR).weight)
                    + matmul(plain_lora_file()[f"{kohya(LINEAR)}.lora_up.weight"],
                             plain_lora_file()[f"{kohya(LINEAR)}.lora_down.weight"]) * 0.5})


@pytest.mark.parametrize("case", list(WEIGHT_DEPENDENT))
def test_save_lora_writes_weight_dependent_kinds_back_unchanged(sd1, tmp_path, case):
    sd, expect = WEIGHT_DEPENDENT[case]()
    weights, _ = _load(sd, sd1, tmp_path)
    out = save_lora(weights, tmp_path / "again.safetensors", family=sd1.family,
                    unet_config=dict(sd1.base.unet.config))
    again = load_file(str(out))
    assert again.keys() == sd.keys()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    if case.startswith("dora"):  # the saved file says DoRA (LyCORIS' flag) and loads back to the same weights
        assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    back, unmatched = lora_for_handle(out, sd1)
    assert unmatched == NOT_APPLIED.get(case, [])
    base = {n: p.detach() for n, p in sd1.base.unet.named_parameters()}
    _check_patched(sd1, [(back, 0.7)], expect(base, 0.7))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_lycoris_files_cross_attention_width_tells_its_family(kind):
    """Without a LoRA down factor, LoHa's hada_w1_b [r, in] and LoKr's factors (in = i1 * i2) give the width."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    if kind == "loha":
        sd = {f"{key}.hada_w1_a": torch.zeros(320, 2), f"{key}.hada_w1_b": torch.zeros(2, 2048),
              f"{key}.hada_w2_a": torch.zeros(320, 2), f"{key}.hada_w2_b": torch.zeros(2, 2048)}
    else:
        sd = {f"{key}.lokr_w1": torch.zeros(4, 8), f"{key}.lokr_w2_a": torch.zeros(80, 2),
              f"{key}.lokr_w2_b": torch.zeros(2, 256)}
    with pytest.raises(FinetuneError, match=r"is for SDXL but the model is SD 1\.x \(its cross-attention input width "
                                            r"is 2048\)"):
        parse_lora(sd, {}, family=Family.SD1, unet_config=None, unet_modules=None, te_modules=None)


def test_parts_comfyui_reads_but_this_pack_does_not_apply_are_listed_by_add_lora(sd1, models_dir):
    """An OFT's rescale (ComfyUI does not apply it either) and a LoRA's reshape_weight (a loaded layer keeps its
    shape) are reported in Add LoRA's note, while the rest of the file applies."""
    sd, _ = oft_file("linear")
    conv = kohya(CONV)
    sd |= {f"{conv}.lora_down.weight": rand(2, 32, 3, 3, seed=96),
           f"{conv}.lora_up.weight": rand(64, 2, 1, 1, seed=97),
           f"{conv}.reshape_weight": torch.tensor([64, 32, 3, 3])}
    path = models_dir / "loras" / "adapters-test-listed.safetensors"
    save_file(sd, str(path))
    try:
        out = N["AddLoRA"]().run(pipe=sd1, lora_name=path.name, strength_unet=1.0, strength_text=1.0)
    finally:
        path.unlink(missing_ok=True)
    assert {m.kind for m in out["result"][0].loras[0].lora.modules.values()} == {"oft", "lora"}
    (note,) = out["ui"]["text"]
    assert "2 keys not applied" in note and f"{kohya(LINEAR)}.rescale" in note and f"{conv}.reshape_weight" in note
