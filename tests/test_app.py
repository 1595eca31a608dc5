"""varlib-app without a server: the model thread's batching, the scale strip, the edit mask, the checks and the
model page, on a tiny random VAR, class- and text-conditional (the served app: test_app_api.py; in a browser:
test_app_browser.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import varlib
from helpers.uploads import png_header_only
from varlib.app import AppService, ModelWorker, SamplingSettings, held_out_emoji, running_fhat_images
from varlib.data.emoji import EmojiDataModule, emoji_category, is_validation_name
from varlib.evaluation import to_uint8_nhwc
from varlib.models.editing import box_keep_mask
from varlib.models.text import SmallTextEncoder

from helpers.model_thread import WAIT_S, hold_model_thread, wait_for_queued

SIDE = 32  # last patch number 16 x downsample 2
NUM_CLASSES = 3


def tiny_vae() -> varlib.MultiScaleVQVAE:
    torch.manual_seed(0)
    return varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8, 16), ch_mult=(1, 1),
                                  num_res_blocks=1, using_sa=False, using_mid_sa=False)


def tiny_var(class_names=None) -> varlib.VAR:
    var = varlib.VAR(tiny_vae(), varlib.VARConfig(depth=2, num_classes=NUM_CLASSES, width=64, num_heads=2)).eval()
    var.class_names = class_names
    return var


def tiny_text_var() -> varlib.VAR:
    vae = tiny_vae()
    torch.manual_seed(1)
    encoder = SmallTextEncoder(width=16, depth=1, num_heads=2, max_length=32)
    text = {"type": "text", "encoder": encoder}
    return varlib.VAR(vae, varlib.VARConfig(depth=2, width=64, num_heads=2, conditioning=text)).eval()


@pytest.fixture(scope="module")
def var():
    return tiny_var()


@pytest.fixture
def service(var):
    service = AppService(var, batch_size=4, max_images=6)
    yield service
    service.close()


# -- the model thread ---------------------------------------------------------------------------------------


class RecordingGenerate:
    """A stand-in for VAR.generate that records its calls and returns each label as a (1,1,1) image."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[tuple[list[int], object]] = []
        self.fail_on = fail_on

    def __call__(self, labels, key):
        self.calls.append((list(labels), key))
        if self.fail_on in labels:
            raise RuntimeError(f"label {self.fail_on} failed")
        return torch.tensor(labels, dtype=torch.float32).view(-1, 1, 1, 1)


def blocked_worker(generate, batch_size):
    """A worker whose thread is busy until the returned event is set, so that requests pile up."""
    worker = ModelWorker(generate, batch_size)
    return worker, hold_model_thread(worker)


def test_waiting_requests_with_equal_settings_share_one_call_up_to_the_batch_size():
    generate = RecordingGenerate()
    worker, release = blocked_worker(generate, batch_size=4)
    a, b = SamplingSettings(1.5, 0, 0.0, 0), SamplingSettings(1.5, 0, 0.0, 1)  # differ in the seed only
    futures = [worker.generate([0], a), worker.generate([1, 2], b), worker.generate([3, 4], a),
               worker.generate([5], a), worker.generate([6], a), worker.generate([7], b)]
    release.set()
    results = [f.result(10).view(-1).tolist() for f in futures]
    worker.close()

    assert results == [[0], [1, 2], [3, 4], [5], [6], [7]]  # each request gets its own images back
    # first call: the first request's settings, the waiting ones that fit (1 + 2 + 1 = 4; [6] would make 5)
    assert generate.calls == [([0, 3, 4, 5], a), ([1, 2, 7], b), ([6], a)]
    assert worker.calls == 3


def test_batch_size_one_samples_each_request_alone_and_a_large_request_is_not_split():
    generate = RecordingGenerate()
    worker, release = blocked_worker(generate, batch_size=1)
    settings = SamplingSettings(2.0, 5, 0.5, 0)
    futures = [worker.generate([0], settings), worker.generate([1], settings), worker.generate([2, 3, 4], settings)]
    release.set()
    assert [f.result(10).shape[0] for f in futures] == [1, 1, 3]
    worker.close()
    assert [labels for labels, _ in generate.calls] == [[0], [1], [2, 3, 4]]


def test_a_failing_call_fails_its_requests_and_the_thread_keeps_serving():
    generate = RecordingGenerate(fail_on=9)
    worker, release = blocked_worker(generate, batch_size=8)
    settings = SamplingSettings(1.0, 0, 0.0, 0)
    bad, also_in_call = worker.generate([9], settings), worker.generate([1], settings)
    release.set()
    with pytest.raises(RuntimeError, match="label 9 failed"):
        bad.result(10)
    with pytest.raises(RuntimeError, match="label 9 failed"):
        also_in_call.result(10)
    assert worker.generate([2], settings).result(10).view(-1).tolist() == [2]
    assert worker.call(lambda: "still serving").result(10) == "still serving"
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.generate([0], settings)


def test_worker_rejects_a_zero_batch_size_and_an_empty_request():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ModelWorker(RecordingGenerate(), 0)
    worker = ModelWorker(RecordingGenerate(), 2)
    with pytest.raises(ValueError, match="at least one label"):
        worker.generate([], SamplingSettings(1.0, 0, 0.0, 0))
    worker.close()


# -- generate and the scale strip -----------------------------------------------------------------------------


def test_generate_returns_var_generate_images_with_class_names(var, service):
    images = service.generate(["2", "0"], 2, 1.5, 20, 0.9, 7)
    assert [caption for _, caption in images] == ["2", "2", "0", "0"]
    want = to_uint8_nhwc(var.generate([2, 2, 0, 0], cfg=1.5, top_k=20, top_p=0.9, seed=7))
    np.testing.assert_array_equal(np.stack([image for image, _ in images]), want)


def test_concurrent_requests_with_equal_settings_are_sampled_in_one_generate_call(var):
    service = AppService(var, batch_size=4, max_images=4)
    release = hold_model_thread(service.worker)  # the model thread is busy while the requests arrive
    results = {}

    def request(name):
        results[name] = service.generate([name], 1, 1.5, 20, 0.9, 3)

    threads = [threading.Thread(target=request, args=(name,)) for name in ("0", "1", "2")]
    try:
        for thread in threads:
            thread.start()
        queued = wait_for_queued(service.worker, 3)  # the arrival order is the call's label order
    finally:
        release.set()
    for thread in threads:
        thread.join(WAIT_S)
    service.close()
    assert len(queued) == 3 and all(len(labels) == 1 for labels in queued)
    order = [labels[0] for labels in queued]
    assert service.worker.calls == 1
    batch = to_uint8_nhwc(var.generate(order, cfg=1.5, top_k=20, top_p=0.9, seed=3))
    for row, label in enumerate(order):
        [(image, caption)] = results[str(label)]
        assert caption == str(label)
        np.testing.assert_array_equal(image, batch[row])


def test_scale_strip_is_the_running_fhat_and_ends_at_the_generated_image(var, service):
    strip = service.scale_strip("1", 2.0, 10, 0.8, 5)
    assert [caption for _, caption in strip] == ["1x1", "2x2", "4x4", "8x8", "16x16"]
    frames = np.stack([image for image, _ in strip]).astype(int)
    np.testing.assert_array_equal(frames[-1], to_uint8_nhwc(var.generate([1], cfg=2.0, top_k=10, top_p=0.8, seed=5))[0])
    assert all(np.abs(frames[i] - frames[-1]).mean() > 0 for i in range(4))  # coarser scales look different

    out = var.generate_tokens([1, 2], cfg=2.0, top_k=10, top_p=0.8, seed=5)
    running = running_fhat_images(var, out.tokens)
    # the picture after scale k decodes the first k+1 token maps (Algorithm 2 on a prefix)
    quant = var.vae.quantize
    for k in (0, 2, 4):
        f_hat = sum(quant.upsampled_residual(quant.embed(t, pn), si, var.patch_nums)
                    for si, (t, pn) in enumerate(zip(out.tokens[:k + 1], var.patch_nums)))
        torch.testing.assert_close(running[k], var.vae.fhat_to_img(f_hat).add(1).mul(0.5), atol=1e-4, rtol=0)


def test_generate_and_strip_name_what_was_expected_for_bad_input(service):
    cases = [
        (lambda: service.generate(["7"], 1, 1.5, 0, 0.0, 0), r"unknown class '7': expected one of the model's classes \(0, 1, 2\)"),
        (lambda: service.generate([], 1, 1.5, 0, 0.0, 0), "pick at least one class, got none"),
        (lambda: service.generate(["0", "1"], 4, 1.5, 0, 0.0, 0), "at most 6 images per request, got 2 classes x 4 = 8"),
        (lambda: service.generate(["0"], 0, 1.5, 0, 0.0, 0), r"count must be an integer in \[1, 6\], got 0"),
        (lambda: service.generate(["0"], 2.5, 1.5, 0, 0.0, 0), r"count must be an integer in \[1, 6\], got 2.5"),
        (lambda: service.generate(["0"], 1, -1, 0, 0.0, 0), r"cfg must be a number in \[0, 1e\+06\], got -1"),
        (lambda: service.generate(["0"], 1, float("nan"), 0, 0.0, 0), "cfg must be a number"),
        (lambda: service.generate(["0"], 1, 1.5, 33, 0.0, 0), r"top_k must be an integer in \[0, 32\], got 33"),
        (lambda: service.generate(["0"], 1, 1.5, 0, 1.5, 0), r"top_p must be a number in \[0, 1\], got 1.5"),
        (lambda: service.generate(["0"], 1, 1.5, 0, 0.5, -3), r"seed must be an integer in \[0, .*\], got -3"),
        (lambda: service.generate(["0"], 1, "many", 0, 0.5, 0), "cfg must be a number .* got 'many'"),
        (lambda: service.scale_strip(None, 1.5, 0, 0.0, 0), "unknown class None"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert service.worker.calls == 0  # nothing bad reached the model
    assert len(service.generate(["0"], 1, 1.5, 0, 0.0, 0)) == 1


def test_class_names_come_from_the_model_file():
    var = tiny_var(class_names=["cat", "dog", "fox"])
    service = AppService(var, batch_size=2)
    try:
        assert [caption for _, caption in service.generate(["fox", "cat"], 1, 1.0, 0, 0.0, 0)] == ["fox", "cat"]
        with pytest.raises(ValueError, match="unknown class '1': expected one of the model's classes \\(cat, dog, fox\\)"):
            service.generate(["1"], 1, 1.0, 0, 0.0, 0)
        assert "3: cat, dog, fox" in service.model_card()
    finally:
        service.close()


# -- edit --------------------------------------------------------------------------------------------------


def drawing(size, box=None, alpha=255):
    """A transparent layer of ``size`` (width, height) with an opaque rectangle ``box`` (left, top, right, bottom)."""
    pixels = np.zeros((size[1], size[0], 4), np.uint8)
    if box is not None:
        left, top, right, bottom = box
        pixels[top:bottom, left:right] = (255, 0, 255, alpha)
    return Image.fromarray(pixels, "RGBA")


def photo(size=(SIDE, SIDE), seed=0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=(size[1], size[0]), mode="bilinear")
    return Image.fromarray(to_uint8_nhwc(pixels)[0])


@pytest.mark.parametrize("mode", ["inpaint", "outpaint", "class"])
def test_edit_maps_the_drawn_region_to_the_token_grid_like_varlib_edit(var, service, mode):
    image = photo((36, 36))  # the eval transform's size for 32 px (1.125 x 32): not resized, centre-cropped by 2
    # rows 10..26 and columns 6..22, cropped: rows 8..24 and columns 4..20 of 32 px, so token rows 4..12 and
    # columns 2..10 of the 16x16 grid
    outcome = service.edit(image, [drawing(image.size, (6, 10, 22, 26))], mode, "2", 3)
    inside = box_keep_mask(16, (0.25, 0.125, 0.75, 0.625), inpainting=True)  # 1 outside the drawn box
    keep = inside if mode != "outpaint" else 1 - inside
    label = 2 if mode == "class" else NUM_CLASSES
    sampling = var.sampling
    want = var.edit(varlib.data.ImageTransform(SIDE, train=False)(image).unsqueeze(0), keep, [label],
                    cfg=sampling.cfg, top_k=sampling.top_k, top_p=sampling.top_p, seed=3)
    np.testing.assert_array_equal(outcome.after, to_uint8_nhwc(want)[0])
    np.testing.assert_array_equal(outcome.before, np.asarray(image)[2:34, 2:34])
    assert outcome.tokens == int((keep == 0).sum()) == (64 if mode != "outpaint" else 256 - 64)
    np.testing.assert_array_equal(outcome.region[..., 0] == 255,
                                  (keep == 0).repeat_interleave(2, 0).repeat_interleave(2, 1).numpy())


def test_edit_crops_a_larger_image_and_its_drawing_alike(var, service):
    image = photo((48, 40))  # resized to 36 px high, centre-cropped to 32x32
    outcome = service.edit(image, [drawing(image.size, (0, 0, 24, 40))], "inpaint", "0", 0)
    assert outcome.before.shape == outcome.after.shape == (SIDE, SIDE, 3)
    regenerated_columns = (outcome.region[..., 0] == 255).any(axis=0)
    assert regenerated_columns[:10].all() and not regenerated_columns[-10:].any()  # the left half, cropped


def test_edit_names_what_was_expected_for_bad_input(service):
    image = photo()
    cases = [
        ((None, [], "inpaint", "0", 0), "upload an image"),
        ((image, [], "inpaint", "0", 0), "draw the region to regenerate on the image: got no drawing"),
        ((image, [drawing(image.size)], "inpaint", "0", 0), "the drawing is empty"),
        ((image, [drawing((16, 16), (0, 0, 8, 8))], "inpaint", "0", 0),
         r"the drawing must have the image's size \(width, height\) \(32, 32\), got \(16, 16\)"),
        ((image, [Image.new("RGB", image.size)], "inpaint", "0", 0), "transparent layer .* got mode RGB"),
        ((image, [drawing(image.size, (0, 0, 1, 1))], "inpaint", "0", 0), "covers no token"),
        ((image, [drawing(image.size, (0, 0, 32, 32))], "outpaint", "0", 0), "covers no token"),
        ((image, [drawing(image.size, (0, 0, 8, 8))], "recolour", "0", 0), "mode must be one of"),
        ((image, [drawing(image.size, (0, 0, 8, 8))], "class", "zebra", 0), "unknown class 'zebra'"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            service.edit(*args)
    grey = photo().convert("L")  # another mode: converted like every decoded image
    assert service.edit(grey, [drawing(grey.size, (0, 0, 16, 16))], "inpaint", "0", 0).tokens == 64


# -- examples and the model page -----------------------------------------------------------------------------


def test_held_out_emoji_are_from_the_validation_split_one_category_after_another():
    data = EmojiDataModule()
    paths = held_out_emoji(12)
    assert len(paths) == 12 and all(path.is_file() for path in paths)
    assert all(is_validation_name(path.name, data.val_fraction, data.split_seed) for path in paths)
    categories = [emoji_category(path.stem) for path in paths]
    assert categories[:9] == data.class_names and categories[9:] == data.class_names[:3]
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        held_out_emoji(0)


def test_model_page_lists_architecture_counts_schedule_and_sampling(var, service):
    page = service.model_card()
    assert "VAR, depth 2, width 64, 2 heads" in page
    assert f"{sum(p.numel() for p in var.parameters()):,} (transformer)" in page
    assert f"{var.num_non_embedding_params():,} without embeddings" in page
    assert "32 codes of 8 channels" in page and "5 scales 1x1, 2x2, 4x4, 8x8, 16x16; 341 tokens; 32x32 px" in page
    assert "cfg=1.5, top_k=900, top_p=0.96" in page and "no model card" in page


# -- the command's configuration -------------------------------------------------------------------------------


def test_bad_app_settings_exit_2_naming_the_setting(tmp_path, caplog):
    from varlib.app.server import serve
    from varlib.cli.entry import run_or_exit
    from varlib.configs import compose_config

    path = tmp_path / "tiny.safetensors"
    varlib.save_var(tiny_var(), path)
    cases = [
        (["batch_size=0"], "batch_size must be an int >= 1, got 0"),
        (["queue_size=-1"], "queue_size must be an int >= 1, got -1"),
        (["port=70000"], "port must be an integer in [1, 65535] or null"),
        (["cpu_threads=0"], "cpu_threads must be an int >= 1, got 0"),
        ([f"examples=[{tmp_path / 'missing.png'}]"], "examples: expected an image file at"),
        (["precision=fp16"], "precision must be one of"),
    ]
    for overrides, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            run_or_exit(serve, compose_config("app", [f"checkpoint={path}", "device=cpu", *overrides]))
        assert exit_info.value.code == 2 and message in caplog.text, (overrides, caplog.text)
    caplog.clear()
    with pytest.raises(SystemExit):
        run_or_exit(serve, compose_config("app", [f"checkpoint={tmp_path / 'none.safetensors'}", "device=cpu"]))
    assert "none.safetensors" in caplog.text and "got nothing there" in caplog.text
    config = compose_config("app", [])
    assert (config.host, config.port, config.batch_size) == ("127.0.0.1", 7860, 8)


# -- a text-conditional model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_var():
    return tiny_text_var()


@pytest.fixture
def text_service(text_var):
    service = AppService(text_var, batch_size=4, max_images=6)
    yield service
    service.close()


def test_generate_from_prompts_returns_var_generate_images_captioned_with_their_prompts(text_var, text_service):
    images = text_service.generate(" red heart\n\ncat face ", 2, 1.5, 20, 0.9, 7)  # one per line, blanks left out
    assert [caption for _, caption in images] == ["red heart", "red heart", "cat face", "cat face"]
    prompts = ["red heart", "red heart", "cat face", "cat face"]
    want = to_uint8_nhwc(text_var.generate(prompts, cfg=1.5, top_k=20, top_p=0.9, seed=7))
    np.testing.assert_array_equal(np.stack([image for image, _ in images]), want)

    negative = text_service.generate("red heart\ncat face", 2, 1.5, 20, 0.9, 7, negative="blue square")
    want = to_uint8_nhwc(text_var.generate(prompts, cfg=1.5, top_k=20, top_p=0.9, seed=7, negative="blue square"))
    np.testing.assert_array_equal(np.stack([image for image, _ in negative]), want)
    assert not np.array_equal(want, np.stack([image for image, _ in images]))  # the negative prompt steers


def test_scale_strip_of_a_prompt_ends_at_the_generated_image(text_var, text_service):
    strip = text_service.scale_strip("cat face", 2.0, 10, 0.8, 5, "red heart")
    assert [caption for _, caption in strip] == ["1x1", "2x2", "4x4", "8x8", "16x16"]
    want = text_var.generate(["cat face"], cfg=2.0, top_k=10, top_p=0.8, seed=5, negative="red heart")
    np.testing.assert_array_equal(strip[-1][0], to_uint8_nhwc(want)[0])


def test_edit_with_a_text_model_is_conditioned_on_the_prompt(text_var, text_service):
    image = photo()
    outcome = text_service.edit(image, [drawing(image.size, (0, 0, 16, 16))], "outpaint", "red heart", 3)
    keep = box_keep_mask(16, (0, 0, 0.5, 0.5), inpainting=False)
    sampling = text_var.sampling
    want = text_var.edit(varlib.data.ImageTransform(SIDE, train=False)(image).unsqueeze(0), keep, ["red heart"],
                         cfg=sampling.cfg, top_k=sampling.top_k, top_p=sampling.top_p, seed=3)
    np.testing.assert_array_equal(outcome.after, to_uint8_nhwc(want)[0])
    assert outcome.tokens == 256 - 64


def test_a_text_model_refuses_empty_prompts_with_a_message(text_service, service):
    image = photo()
    region = [drawing(image.size, (0, 0, 16, 16))]
    cases = [
        (lambda: text_service.generate("", 1, 1.5, 0, 0.0, 0), r"type at least one prompt \(one per line\): got none"),
        (lambda: text_service.generate(" \n \n", 1, 1.5, 0, 0.0, 0), "type at least one prompt"),
        (lambda: text_service.generate(None, 1, 1.5, 0, 0.0, 0), "type at least one prompt"),
        (lambda: text_service.generate("a\nb\nc\nd", 2, 1.5, 0, 0.0, 0),
         "at most 6 images per request, got 4 prompts x 2 = 8"),
        (lambda: text_service.generate("red heart", 1, 1.5, 0, 0.0, 0, negative=3), "negative prompt must be text"),
        (lambda: text_service.scale_strip("", 1.5, 0, 0.0, 0), "type at least one prompt"),
        (lambda: text_service.scale_strip("red heart\ncat face", 1.5, 0, 0.0, 0),
         r"the scale strip takes one prompt, got 2: \['red heart', 'cat face'\]"),
        (lambda: text_service.edit(image, region, "inpaint", "  ", 0), "type at least one prompt"),
        (lambda: service.generate(["0"], 1, 1.5, 0, 0.0, 0, negative="red heart"), "takes no negative prompt"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert text_service.worker.calls == service.worker.calls == 0  # nothing bad reached the model


def test_model_page_of_a_text_model_names_its_encoder(text_service):
    page = text_service.model_card()
    assert "| conditioning | text-conditional (prompts): text encoder SmallTextEncoder (16-wide features), with " \
           "cross-attention |" in page
    assert "| classes |" not in page
    assert text_service.class_names == []


# -- upload size ------------------------------------------------------------------------------------------------


def test_an_upload_larger_than_max_upload_pixels_is_refused_from_its_header(tmp_path, var):
    from varlib.app.service import MAX_UPLOAD_PIXELS, open_upload

    huge = tmp_path / "huge.png"
    png_header_only(huge, 12_000, 12_000)  # 144 Mpx: over PIL's warning limit, under its error limit
    with pytest.raises(ValueError, match=rf"12000x12000 = 144,000,000 pixels, more than the "
                                         rf"{MAX_UPLOAD_PIXELS:,} this app accepts \(max_upload_pixels\)"):
        open_upload(huge, MAX_UPLOAD_PIXELS)
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20_000, 20_000)  # 400 Mpx: PIL's own decompression-bomb error, named as ours
    with pytest.raises(ValueError, match="exceeds limit.*this app accepts at most 1,000 pixels"):
        open_upload(bomb, 1000)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        open_upload(tmp_path / "text.png", MAX_UPLOAD_PIXELS)
    small = tmp_path / "small.png"
    photo().save(small)
    assert open_upload(small, SIDE * SIDE).size == (SIDE, SIDE)  # at the limit: accepted

    service = AppService(var, max_upload_pixels=30 * 30)
    try:
        image = photo()
        with pytest.raises(ValueError, match="the image is 32x32 = 1,024 pixels, more than the 900"):
            service.edit(image, [drawing(image.size, (0, 0, 16, 16))], "inpaint", "0", 0)
        assert service.worker.calls == 0
    finally:
        service.close()
