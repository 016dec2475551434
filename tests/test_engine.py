"""The one denoising loop against diffusers' own pipelines (the oracle), and its edge cases."""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from diffusionx import InvalidInputError, PromptTruncatedWarning
from diffusionx.engine import SCHEDULERS, make_scheduler, steps_for_strength

STEPS = 10


def oracle(engine, scheduler, img2img=False):
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=engine.vae,
        text_encoder=engine.text_encoder,
        tokenizer=engine.tokenizer,
        unet=engine.unet,
        scheduler=make_scheduler(scheduler, engine.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_text_to_image_matches_diffusers(untrained_pair, scheduler):
    engine = untrained_pair.cloud
    expected = oracle(engine, scheduler)(
        "a red circle on the left",
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    got = engine.generate("a red circle on the left", seed=3, steps=STEPS, scheduler=scheduler, decode=False)
    assert got.unet_steps == STEPS
    torch.testing.assert_close(got.latents, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
@pytest.mark.parametrize("strength", [1 / STEPS, 0.5, 0.7])
def test_image_to_image_matches_diffusers(untrained_pair, scheduler, strength):
    engine = untrained_pair.edge
    init = engine.generate("a blue square", seed=1, steps=4, decode=False).latents
    expected = oracle(engine, scheduler, img2img=True)(
        "a blue square at the top",
        image=init,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images
    got = engine.generate(
        "a blue square at the top",
        seed=5,
        steps=STEPS,
        strength=strength,
        init_latents=init,
        guidance_scale=5.0,
        scheduler=scheduler,
        decode=False,
    )
    assert got.unet_steps == round(strength * STEPS)
    torch.testing.assert_close(got.latents, expected, rtol=0, atol=1e-5)


def test_strength_one_is_text_to_image(untrained_pair):
    engine = untrained_pair.edge
    init = torch.randn(engine.latent_shape())
    fresh = engine.generate("a star", seed=9, steps=STEPS, decode=False)
    from_latent = engine.generate("a star", seed=9, steps=STEPS, strength=1.0, init_latents=init, decode=False)
    assert from_latent.unet_steps == STEPS
    torch.testing.assert_close(from_latent.latents, fresh.latents, rtol=0, atol=0)


def test_strength_zero_returns_input_without_unet_call(untrained_pair, count_unet_calls):
    engine = untrained_pair.edge
    init = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(0))
    counter = count_unet_calls(engine.unet)
    got = engine.generate("a star", seed=2, steps=STEPS, strength=0.0, init_latents=init, decode=False)
    assert counter.batches == []
    assert got.unet_steps == 0
    assert torch.equal(got.latents, init)


@pytest.mark.parametrize(
    ("strength", "steps", "expected"),
    [(0.0, 20, 0), (1 / 20, 20, 1), (0.01, 20, 1), (0.3, 10, 3), (0.5, 20, 10), (0.55, 20, 11), (1.0, 7, 7)],
)
def test_steps_for_strength_rounds_up_and_never_zero(strength, steps, expected):
    assert steps_for_strength(strength, steps) == expected


def test_unet_is_called_ceil_strength_times_steps(untrained_pair, count_unet_calls):
    engine = untrained_pair.edge
    init = torch.zeros(engine.latent_shape())
    counter = count_unet_calls(engine.unet)
    got = engine.generate("a ring", seed=0, steps=20, strength=0.33, init_latents=init, decode=False)
    assert got.unet_steps == math.ceil(0.33 * 20) == len(counter.batches)


def test_decode_matches_diffusers_images(untrained_pair):
    engine = untrained_pair.edge
    expected = oracle(engine, "ddim")(
        "a heart", num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="np"
    ).images[0]
    image = engine.generate("a heart", seed=4, steps=3).image
    assert np.abs(np.asarray(image, dtype=np.int16) - np.round(expected * 255).astype(np.int16)).max() <= 1


def test_batched_step_equals_separate_runs(untrained_pair, count_unet_calls):
    """Samples at different strengths share one U-Net call per step and get their solo results."""
    engine = untrained_pair.cloud
    init = engine.generate("a cross", seed=0, steps=2, decode=False).latents
    specs = [("a red cross", 0.3, 11), ("a green heart on the right", 1.0, 12), ("a ring", 0.6, 13)]

    def job(prompt, strength, seed):
        emb = engine.encode_prompt(prompt)
        return engine.start(emb, seed=seed, steps=10, strength=strength, init_latents=init)

    solo = []
    for spec in specs:
        j = job(*spec)
        engine.run([j])
        solo.append(j.latents)
    jobs = [job(*spec) for spec in specs]
    counter = count_unet_calls(engine.unet)
    engine.run(jobs)
    assert len(counter.batches) == 10  # the longest job's steps; the others ride along
    assert counter.batches[0] == 2 * 3  # CFG doubles each sample
    for j, expected in zip(jobs, solo):
        torch.testing.assert_close(j.latents, expected, rtol=0, atol=1e-4)


class ScaleCrossAttention:
    """A minimal attention hook: scales cross-attention outputs, and records what it saw."""

    def __init__(self, factor):
        self.factor, self.steps, self.finished, self.saved = factor, [], [], None

    def install(self, unet):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.saved = unet.attn_processors
        factor = self.factor

        class Scaled(AttnProcessor2_0):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
                out = super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)
                return out * factor if encoder_hidden_states is not None else out

        unet.set_attn_processor({name: Scaled() for name in self.saved})

    def remove(self, unet):
        unet.set_attn_processor(self.saved)

    def on_step(self, step_index, num_steps, timestep):
        self.steps.append((step_index, num_steps, timestep))

    def after_step(self, step_index, num_steps):
        self.finished.append(step_index)


def test_attention_hook_is_installed_called_and_removed(untrained_pair):
    engine = untrained_pair.edge
    before = {k: type(v) for k, v in engine.unet.attn_processors.items()}
    plain = engine.generate("a star", seed=1, steps=5, decode=False).latents
    hook = ScaleCrossAttention(3.0)
    hooked = engine.generate("a star", seed=1, steps=5, hook=hook, decode=False).latents
    assert [s[0] for s in hook.steps] == [0, 1, 2, 3, 4]
    assert hook.finished == [0, 1, 2, 3, 4]  # after every step, the last one included
    assert not torch.allclose(plain, hooked, atol=1e-3)  # the hook really changed the output
    assert {k: type(v) for k, v in engine.unet.attn_processors.items()} == before
    again = engine.generate("a star", seed=1, steps=5, decode=False).latents
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_hooked_job_never_shares_a_batch(untrained_pair):
    engine = untrained_pair.edge
    emb = engine.encode_prompt("a star")
    jobs = [engine.start(emb, seed=1, steps=3), engine.start(emb, seed=2, steps=3, hook=ScaleCrossAttention(2))]
    with pytest.raises(ValueError, match="alone"):
        engine.step(jobs)
    engine.run(jobs)  # run() separates them
    assert all(j.done for j in jobs)


@pytest.mark.filterwarnings("ignore:the embedded models know only")  # a real DiffusionDB prompt: out of the world
def test_long_prompt_is_truncated_with_a_warning(untrained_pair, real_prompts):
    engine = untrained_pair.edge
    longest = max(real_prompts, key=len)
    with pytest.warns(PromptTruncatedWarning, match="cut"):
        emb = engine.encode_prompt(longest + " unique suffix")
    assert emb.truncated
    assert emb.cond.shape[1] == engine.tokenizer.model_max_length


def test_out_of_vocabulary_words_warn_once_and_are_reported(untrained_pair):
    from diffusionx import OutOfVocabularyWarning
    from diffusionx.engine import uses_world_tokenizer

    engine = untrained_pair.edge
    assert engine.world_vocabulary and uses_world_tokenizer(engine.tokenizer)
    with pytest.warns(OutOfVocabularyWarning, match=r"zebra, playing, xylophone.*diffusionx vocab"):
        gen = engine.generate("a zebra playing a xylophone", seed=0, steps=1)
    assert gen.unknown_words == ("zebra", "playing", "xylophone")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfVocabularyWarning)
        again = engine.generate("a zebra and a xylophone", seed=0, steps=1)  # the same words: no second warning
        assert again.unknown_words == ("zebra", "xylophone")
        assert engine.generate("a circle, black background", seed=0, steps=1).unknown_words == ()


def test_hub_tokenizers_are_not_the_world_vocabulary():
    from diffusionx.engine import uses_world_tokenizer

    class OtherTokenizer:
        def get_vocab(self):
            return {"a": 0, "cat": 1}

    assert not uses_world_tokenizer(OtherTokenizer()) and not uses_world_tokenizer(object())


def test_real_prompts_encode(untrained_pair, real_prompts):
    """Unicode, emoji, odd punctuation and very long prompts from DiffusionDB all encode."""
    engine = untrained_pair.edge
    odd = [p for p in real_prompts if not p.isascii()][:10] + real_prompts[:20]
    from diffusionx import OutOfVocabularyWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        warnings.simplefilter("ignore", OutOfVocabularyWarning)  # real prompts are not world prompts
        for prompt in odd:
            emb = engine.encode_prompt(prompt)
            assert torch.isfinite(emb.cond).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "   "}, "empty"),
        ({"strength": -0.1}, r"\[0, 1\]"),
        ({"strength": 1.5}, r"\[0, 1\]"),
        ({"strength": float("nan")}, "number"),
        ({"strength": "0.5"}, "number"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"seed": "7"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"height": 60}, "multiple"),
        ({"width": 0}, "multiple"),
        ({"guidance_scale": -1.0}, "guidance"),
        ({"strength": 0.5, "init_latents": None}, "needs input latents"),
        ({"strength": 0.5, "init_latents": torch.zeros(1, 4, 8, 8)}, "shape"),
    ],
)
def test_bad_input_is_a_clear_error(untrained_pair, kwargs, message):
    args = {"prompt": "a red circle", "seed": 0, "steps": 4, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        untrained_pair.edge.generate(args.pop("prompt"), **args)


def test_unknown_scheduler(untrained_pair):
    with pytest.raises(InvalidInputError, match="ddim"):
        untrained_pair.edge.generate("a ring", seed=0, steps=2, scheduler="plms")


def test_a_job_may_carry_several_samples(untrained_pair):
    """Attention control runs its source and edit branches as one job of two samples."""
    from diffusionx.engine import PromptEmbeddings

    engine = untrained_pair.edge
    a, b = engine.encode_prompt("a red ring"), engine.encode_prompt("a blue ring")
    single = []
    for emb, seed in ((a, 1), (b, 2)):
        job = engine.start(emb, seed=seed, steps=4)
        engine.run([job])
        single.append(job.latents)
    jobs = [engine.start(a, seed=1, steps=4), engine.start(b, seed=2, steps=4)]
    pair = PromptEmbeddings(torch.cat([a.cond, b.cond]), torch.cat([a.uncond, b.uncond]))
    both = engine.start(pair, seed=1, steps=4)
    both.latents = torch.cat([j.latents for j in jobs])
    engine.run([both])
    torch.testing.assert_close(both.latents, torch.cat(single), rtol=0, atol=1e-4)
