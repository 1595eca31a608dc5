"""varlib-app served on 127.0.0.1, called through gradio_client: every endpoint, bad input answered in the page while
the app keeps serving, requests batched into one VAR.generate call, and a full queue that says so."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed (pip install 'varlib[app]')")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402

import varlib  # noqa: E402
from helpers.uploads import png_header_only  # noqa: E402
from varlib.app import server as app_server  # noqa: E402
from varlib.configs import compose_config  # noqa: E402
from varlib.data import ImageTransform  # noqa: E402
from varlib.evaluation import to_uint8_nhwc  # noqa: E402
from varlib.models.editing import box_keep_mask  # noqa: E402
from varlib.models.sampling import SamplingConfig  # noqa: E402
from varlib.models.text import SmallTextEncoder  # noqa: E402

from helpers.model_thread import WAIT_S, hold_model_thread, wait_for_queued  # noqa: E402

pytestmark = pytest.mark.slow  # starts Gradio servers (imports and start-up take several seconds)
SIDE = 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8, 16), ch_mult=(1, 1),
                                 num_res_blocks=1, using_sa=False, using_mid_sa=False)
    var = varlib.VAR(vae, varlib.VARConfig(depth=2, num_classes=3, width=64, num_heads=2))
    var.sampling = SamplingConfig(cfg=2.0, top_k=20, top_p=0.9)
    path = tmp_path_factory.mktemp("model") / "tiny_var.safetensors"
    varlib.save_var(var, path)
    return path


def serve(model_file, *overrides):
    config = compose_config("app", [f"checkpoint={model_file}", "device=cpu", f"port={free_port()}", *overrides])
    return app_server.serve(config, block=False)


@pytest.fixture(scope="module")
def server(model_file):
    server = serve(model_file, "batch_size=4", "max_images=6", "queue_size=8")
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def files(tmp_path, image_size=(SIDE, SIDE), box=(0, 0, 16, 16)):
    """An image and a drawing layer (opaque inside ``box``) as uploads, in a folder of their own under tmp_path."""
    tmp_path = tmp_path / f"{image_size}_{box}"
    tmp_path.mkdir()
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=(image_size[1], image_size[0]), mode="bilinear")
    Image.fromarray(to_uint8_nhwc(pixels)[0]).save(tmp_path / "image.png")
    layer = np.zeros((image_size[1], image_size[0], 4), np.uint8)
    left, top, right, bottom = box
    layer[top:bottom, left:right] = (255, 0, 255, 255)
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    return {"background": handle_file(tmp_path / "image.png"), "layers": [handle_file(tmp_path / "layer.png")],
            "composite": None}


def test_the_app_listens_on_localhost_and_lists_its_endpoints(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/generate", "/scale_strip", "/edit", "/model_card"}


def test_generate_endpoint_returns_the_models_samples_with_the_files_defaults(server, client):
    samples = client.predict(["2", "0"], 2, 2.0, 20, 0.9, 4, api_name="/generate")
    assert [sample["caption"] for sample in samples] == ["2", "2", "0", "0"]
    want = to_uint8_nhwc(server.service.var.generate([2, 2, 0, 0], seed=4))  # the file's sampling: cfg 2, 20, 0.9
    np.testing.assert_array_equal(np.stack([read(s["image"]) for s in samples]), want)
    # the page starts at the model file's sampling settings
    parameters = {p["parameter_name"]: p for p in
                  client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]}
    assert (parameters["cfg"]["parameter_default"], parameters["top_k"]["parameter_default"],
            parameters["top_p"]["parameter_default"]) == (2.0, 20, 0.9)


def test_scale_strip_endpoint_shows_every_scale_ending_at_the_sample(server, client):
    strip = client.predict("1", 2.0, 20, 0.9, 6, api_name="/scale_strip")
    assert [frame["caption"] for frame in strip] == ["1x1", "2x2", "4x4", "8x8", "16x16"]
    frames = np.stack([read(frame["image"]) for frame in strip])
    np.testing.assert_array_equal(frames[-1], to_uint8_nhwc(server.service.var.generate([1], seed=6))[0])
    assert len({frame.tobytes() for frame in frames}) == 5


def test_edit_endpoint_returns_before_region_and_after(server, client, tmp_path):
    # a 36 px image is centre-cropped by 2 to the model's 32 px: the drawing covers the crop's top-left quarter
    upload = files(tmp_path, image_size=(36, 36), box=(2, 2, 18, 18))
    comparison, status = client.predict(upload, "class", "1", 0, api_name="/edit")
    assert [item["caption"] for item in comparison] == ["before", "regenerated tokens", "after"]
    before, region, after = (item["image"] for item in comparison)
    assert status == "64 tokens regenerated"  # the top-left quarter of the 16x16 grid
    image_file = upload["background"]["path"]
    np.testing.assert_array_equal(read(before), read(image_file)[2:34, 2:34])
    mask = read(region)[..., 0] == 255
    assert mask[:16, :16].all() and mask.sum() == 16 * 16
    var = server.service.var
    image = ImageTransform(SIDE, train=False)(Image.open(image_file).convert("RGB")).unsqueeze(0)
    want = var.edit(image, box_keep_mask(16, (0, 0, 0.5, 0.5)), [1], cfg=2.0, top_k=20, top_p=0.9, seed=0)
    np.testing.assert_array_equal(read(after), to_uint8_nhwc(want)[0])


def test_model_card_endpoint(client):
    page = client.predict(api_name="/model_card")
    assert "VAR, depth 2, width 64, 2 heads" in page and "cfg=2.0, top_k=20, top_p=0.9" in page


def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(client, tmp_path):
    upload = files(tmp_path)
    cases = [
        (("/generate", ["9"], 1, 2.0, 20, 0.9, 0), "not in the list of choices"),  # Gradio checks its choices
        (("/generate", [], 1, 2.0, 20, 0.9, 0), "pick at least one class"),
        (("/generate", ["0"], 1000, 2.0, 20, 0.9, 0), "greater than maximum value 6"),  # a huge count
        (("/generate", ["0", "1"], 4, 2.0, 20, 0.9, 0), "at most 6 images per request, got 2 classes x 4 = 8"),
        (("/generate", ["0"], 1, -2.0, 20, 0.9, 0), "less than minimum value 0"),
        (("/generate", ["0"], 1, 2.0, 20, 3.0, 0), "greater than maximum value 1"),
        (("/scale_strip", "0", 2.0, 99, 0.9, 0), "greater than maximum value 32"),
        (("/edit", {**upload, "layers": []}, "inpaint", "0", 0), "got no drawing"),
        (("/edit", {**files(tmp_path, box=(0, 0, 0, 0))}, "inpaint", "0", 0), "the drawing is empty"),
        (("/edit", {**files(tmp_path, box=(0, 0, SIDE, SIDE))}, "outpaint", "0", 0), "covers no token"),
        (("/edit", {**upload, "background": None}, "inpaint", "0", 0), "upload an image"),
        (("/edit", upload, "recolour", "0", 0), r"mode must be one of \('inpaint', 'outpaint', 'class'\)"),
    ]
    wrong_size = tmp_path / "small_layer.png"
    Image.new("RGBA", (8, 8), (255, 0, 255, 255)).save(wrong_size)
    cases.append((("/edit", {**upload, "layers": [handle_file(wrong_size)]}, "inpaint", "0", 0),
                  r"must have the image's size \(width, height\) \(32, 32\), got \(8, 8\)"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    cases.append((("/edit", {**upload, "background": handle_file(corrupt)}, "inpaint", "0", 0),
                  "cannot identify image file"))
    huge = tmp_path / "huge.png"  # a header that says 12000 x 12000, no pixels: refused before any decoding
    png_header_only(huge, 12_000, 12_000)
    cases.append((("/edit", {**upload, "background": handle_file(huge)}, "inpaint", "0", 0),
                  "the image is 12000x12000 = 144,000,000 pixels, more than the 16,777,216 this app accepts"))
    for (endpoint, *args), message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name=endpoint)
            pytest.fail(f"{endpoint} answered bad input expecting {message!r}")
    assert len(client.predict(["0"], 1, 2.0, 20, 0.9, 0, api_name="/generate")) == 1
    assert client.predict(upload, "inpaint", "0", 0, api_name="/edit")[1] == "64 tokens regenerated"


def wait_for_status(job, code) -> None:
    """Waits until the server's queue messages have given ``job`` the status ``code`` (gradio_client offers no
    event for a status change, so this polls the status the client keeps; the bound only stops a stuck test)."""
    deadline = time.monotonic() + WAIT_S
    while job.status().code != code:
        assert time.monotonic() < deadline, f"the job never reached {code}: {job.status().code}"
        time.sleep(0.02)


def test_concurrent_requests_with_equal_settings_share_one_generate_call(server, client):
    worker = server.service.worker
    release = hold_model_thread(worker)  # the model is busy while four requests arrive
    calls = worker.calls
    try:
        jobs = [client.submit([name], 1, 2.0, 20, 0.9, 11, api_name="/generate") for name in ("0", "1", "2", "0")]
        wait_for_queued(worker, 4)
    finally:
        release.set()
    results = [job.result(timeout=WAIT_S) for job in jobs]
    assert worker.calls == calls + 1
    assert [r[0]["caption"] for r in results] == ["0", "1", "2", "0"]


def test_a_full_queue_says_so(model_file):
    server = serve(model_file, "batch_size=1", "queue_size=1")
    release = None
    try:
        client = Client(server.url, verbose=False)
        worker = server.service.worker
        release = hold_model_thread(worker)
        running = client.submit(["0"], 1, 2.0, 20, 0.9, 0, api_name="/generate")  # handed to the app, waits
        wait_for_queued(worker, 1)
        waiting = client.submit(["1"], 1, 2.0, 20, 0.9, 0, api_name="/generate")  # the one place in the queue
        wait_for_status(waiting, Status.IN_QUEUE)
        refused = client.submit(["2"], 1, 2.0, 20, 0.9, 0, api_name="/generate")
        with pytest.raises(QueueError, match="Queue is full"):
            refused.result(timeout=WAIT_S)  # an unbounded queue would keep it waiting: a TimeoutError
        release.set()
        assert running.result(timeout=WAIT_S)[0]["caption"] == "0"
        assert waiting.result(timeout=WAIT_S)[0]["caption"] == "1"
        assert client.predict(["2"], 1, 2.0, 20, 0.9, 0, api_name="/generate")[0]["caption"] == "2"
    finally:
        if release is not None:
            release.set()
        server.close()


def test_a_text_model_takes_prompts_and_a_negative_prompt(tmp_path):
    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8, 16), ch_mult=(1, 1),
                                 num_res_blocks=1, using_sa=False, using_mid_sa=False)
    encoder = SmallTextEncoder(width=16, depth=1, num_heads=2, max_length=32)
    text = {"type": "text", "encoder": encoder}
    var = varlib.VAR(vae, varlib.VARConfig(depth=2, width=64, num_heads=2, conditioning=text))
    var.sampling = SamplingConfig(cfg=2.0, top_k=20, top_p=0.9)
    varlib.save_var(var, tmp_path / "text_var.safetensors")
    server = serve(tmp_path / "text_var.safetensors")
    try:
        client = Client(server.url, verbose=False)
        samples = client.predict("red heart\ncat face", "blue square", 1, 2.0, 20, 0.9, 4, api_name="/generate")
        assert [sample["caption"] for sample in samples] == ["red heart", "cat face"]
        want = server.service.var.generate(["red heart", "cat face"], seed=4, negative="blue square")
        np.testing.assert_array_equal(np.stack([read(s["image"]) for s in samples]), to_uint8_nhwc(want))
        strip = client.predict("red heart", "", 2.0, 20, 0.9, 4, api_name="/scale_strip")
        assert [frame["caption"] for frame in strip] == ["1x1", "2x2", "4x4", "8x8", "16x16"]
        with pytest.raises(AppError, match="type at least one prompt"):
            client.predict("\n", "", 1, 2.0, 20, 0.9, 0, api_name="/generate")
        assert "text-conditional (prompts): text encoder SmallTextEncoder" in client.predict(api_name="/model_card")
    finally:
        server.close()
