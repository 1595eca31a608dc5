"""Sharing: the model card of save_pretrained round-trips through from_pretrained, push_to_hub uploads the folder
to a local stand-in for the Hub API, and official files by name (FoundationVision/var/var_d16.pth) are found in
$VARLIB_WEIGHTS or fail offline saying what to fetch and where to put it."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from helpers.hub import switch_hub_off

import varlib
from varlib.files.format import OFFICIAL_TOKENIZER
from varlib.models.transformer import VAR, VARConfig
from varlib.models.vqvae import MultiScaleVQVAE


@pytest.fixture(scope="module")
def tiny_var():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                          using_sa=False, using_mid_sa=False, norm_groups=8)
    var = VAR(vae, VARConfig(depth=2, num_classes=3, width=32, num_heads=2)).eval()
    var.class_names = ["cat", "dog", "fox"]
    return var


def test_model_card_is_written_and_round_trips_through_from_pretrained(tiny_var, tmp_path):
    training = {"data": "pets (3 class folders, 120 images)", "steps": 300, "init_from": "pretrained.safetensors",
                "metrics": {"val/loss_avg": 2.5}}
    folder = tiny_var.save_pretrained(tmp_path / "pets", training=training)
    card = (folder / "README.md").read_text()
    params = sum(p.numel() for p in tiny_var.parameters())
    assert card.startswith("---\nlicense: mit\nlibrary_name: varlib\n")
    assert f"depth 2, width 32, 2 heads, 3 classes, {params:,} parameters" in card
    assert f"Tokenizer (in the same file): {sum(p.numel() for p in tiny_var.vae.parameters()):,} parameters" in card
    assert "Classes: cat, dog, fox" in card
    assert f"cfg {tiny_var.sampling.cfg}, top_k {tiny_var.sampling.top_k}, top_p {tiny_var.sampling.top_p}" in card
    assert "- steps: 300" in card and "| val/loss_avg | 2.5 |" in card and "- data: pets" in card
    loaded = VAR.from_pretrained(folder)
    assert loaded.class_names == ["cat", "dog", "fox"]
    for key, value in tiny_var.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert varlib.load(folder).class_names == ["cat", "dog", "fox"]


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub API routes an upload uses: repo creation, the card's YAML check, pre-upload (every file 'regular') and the commit,
    whose NDJSON lines carry the files base64-encoded; the files land in ``server.files``."""

    def _reply(self, payload: dict, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(("POST", self.path))
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.server.created.append(request)
            return self._reply({"url": f"{self.server.url}/{request.get('organization') or 'me'}/{request['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's front matter
            self.server.validated.append(json.loads(body)["content"])
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply({"commitUrl": f"{self.server.url}/me/pets/commit/abc", "commitOid": "a" * 40,
                                "success": True})
        self._reply({"error": f"unexpected {self.path}"}, 404)

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        self._reply({"error": f"unexpected {self.path}"}, 404)


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.url = f"http://127.0.0.1:{server.server_port}"
    server.files, server.created, server.requests, server.validated = {}, [], [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_push_to_hub_uploads_weights_config_and_card(tiny_var, fake_hub, tmp_path):
    url = tiny_var.push_to_hub("me/pets", training={"steps": 7}, endpoint=fake_hub.url, token="hf_fake")
    assert url.endswith("/me/pets/commit/abc")
    assert fake_hub.created and fake_hub.created[0]["name"] == "pets"
    assert sorted(fake_hub.files) == ["README.md", "config.json", "model.safetensors"]
    assert b"- steps: 7" in fake_hub.files["README.md"]
    # what arrived is a loadable folder
    for name, content in fake_hub.files.items():
        (tmp_path / name).write_bytes(content)
    assert torch.equal(varlib.load(tmp_path).head.weight, tiny_var.head.weight)


def test_official_names_resolve_in_the_weights_folder_and_fail_offline_with_advice(tmp_path, monkeypatch):
    from conftest import load_bundle

    bundle = load_bundle("tiny10")  # the official 256px schedule, so the tokenizer file alone tells its schedule
    folder = tmp_path / "FoundationVision" / "var"
    folder.mkdir(parents=True)
    monkeypatch.setenv("VARLIB_WEIGHTS", str(tmp_path))
    switch_hub_off(monkeypatch)  # set only as a variable, it took 46 s after another test's import
    with pytest.raises(FileNotFoundError, match=r"download https://huggingface.co/FoundationVision/var/resolve/main/"
                                                r"var_d16.pth and put it at .*FoundationVision/var/var_d16.pth"):
        varlib.load("FoundationVision/var/var_d16.pth")
    torch.save(bundle["var_state_dict"], folder / "var_d16.pth")
    with pytest.raises(FileNotFoundError, match=rf"resolve/main/{OFFICIAL_TOKENIZER} and put it at"):
        varlib.load("FoundationVision/var/var_d16.pth")
    torch.save(bundle["vqvae_state_dict"], folder / OFFICIAL_TOKENIZER)
    var = varlib.load("FoundationVision/var/var_d16.pth")
    assert var.num_classes == bundle["config"]["null_class"]
    assert torch.equal(var.head.weight, bundle["var_state_dict"]["head.weight"].float())
