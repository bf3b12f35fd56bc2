"""Model handle, prompt encoding and sampling on tiny models of every family."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.sampling import SAMPLER_NAMES, SampleSettings, make_scheduler, sample, sample_prompts_patched


def _settings(**kw) -> SampleSettings:
    base = dict(prompt="a red circle on a white background", negative="blurry", seed=7, steps=3, cfg=5.0,
                width=64, height=64)
    base.update(kw)
    return SampleSettings(**base)


def test_sample_shape_and_range(tiny_handles, family):
    img = sample(tiny_handles[family], _settings(batch_size=2))
    assert img.shape == (2, 64, 64, 3)
    assert img.dtype == torch.float32 and img.device.type == "cpu"
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert not torch.equal(img[0], img[1]), "batch items must get different noise"


def test_same_seed_same_image(tiny_handles, family):
    h = tiny_handles[family]
    a = sample(h, _settings())
    b = sample(h, _settings())
    c = sample(h, _settings(seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_prompt_changes_image(tiny_handles, family):
    h = tiny_handles[family]
    assert not torch.equal(sample(h, _settings()), sample(h, _settings(prompt="a blue square")))


def test_non_multiple_of_8_is_refused(tiny_handles):
    with pytest.raises(FinetuneError, match=r"width 100 is not a positive multiple of 8.*Fix: use 96 or 104"):
        sample(tiny_handles["sd1"], _settings(width=100))


def test_zero_steps_refused(tiny_handles):
    with pytest.raises(FinetuneError, match="steps"):
        sample(tiny_handles["sd1"], _settings(steps=0))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(tiny_handles, sampler):
    img = sample(tiny_handles["sd1"], _settings(sampler=sampler, steps=2))
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def test_unknown_sampler_and_bad_combination(tiny_handles):
    cfg = tiny_handles["sd1"].base.scheduler_config
    with pytest.raises(FinetuneError, match="unknown sampler 'foo'.*Fix: use one of: euler"):
        make_scheduler(cfg, "foo", "normal")
    with pytest.raises(FinetuneError, match="cannot use the 'karras' schedule"):
        make_scheduler(cfg, "ddim", "karras")


def test_schedules_map_to_diffusers_options(tiny_handles):
    cfg = tiny_handles["sd1"].base.scheduler_config
    assert make_scheduler(cfg, "euler", "karras").config.use_karras_sigmas is True
    assert make_scheduler(cfg, "euler", "sgm_uniform").config.timestep_spacing == "trailing"
    assert make_scheduler(cfg, "dpmpp_2m", "normal").config.algorithm_type == "dpmsolver++"
    # a fresh scheduler per call: they keep state
    assert make_scheduler(cfg, "euler", "normal") is not make_scheduler(cfg, "euler", "normal")


def test_v_prediction_family(tiny_handles):
    assert tiny_handles["sd2"].base.prediction_type == "v_prediction"
    assert tiny_handles["sd1"].base.prediction_type == "epsilon"


def test_several_prompts_in_one_batch_draw_what_each_draws_alone(tiny_handles, family):
    """In-loop scoring samples all its prompts in one batch: each prompt's images are those Sample draws for its
    seed and count (to float tolerance: a bigger batch may take other kernel paths), and the prompts do not mix."""
    h = tiny_handles[family]
    s = _settings(cfg=5.0)
    probes = [("a red circle", 2, 11), ("a blue square on a gray background, long prompt " * 8, 1, 12)]
    with h.patched():
        together = sample_prompts_patched(h, s, probes)
    alone = [sample(h, replace(s, prompt=p, batch_size=n, seed=seed)) for p, n, seed in probes]
    assert [x.shape[0] for x in together] == [2, 1]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=2e-4), float((a - b).abs().max())
    assert (together[0][:1] - together[1]).abs().max() > 1e-3  # different prompts and seeds, different images
