"""varlib's model file format, and ``save_pretrained`` / ``from_pretrained`` on the models in the Hugging Face
Hub convention (the official code uses ``PyTorchModelHubMixin``).

A model file is safetensors weights plus the constructor configs in the file's metadata (:func:`model_metadata`).
A tokenizer file holds ``MultiScaleVQVAE`` weights; a transformer file holds the transformer (a VAR under
``var.``, the raster-AR baseline under ``ar.``) and its tokenizer under ``vae.``, so one file is enough to sample,
and the transformer's recommended sampling settings (``.sampling``). A :func:`save_pretrained` folder holds
``model.safetensors`` (that file) and ``config.json`` (the same configs, readable); :func:`from_pretrained` also
takes a Hub repo id, downloaded with the optional ``huggingface_hub`` package.

The model classes a file kind builds are listed in :data:`MODEL_CLASSES`; their ``from_pretrained`` and
``save_pretrained`` methods (:class:`varlib.models.pretrained.PretrainedMixin`) call this module.
:func:`varlib.load` (:mod:`varlib.files.loading`) opens these files and every other model file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from varlib.models.pretrained import PretrainedMixin
from varlib.models.raster_ar import RasterAR
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE

FORMAT = "varlib/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# metadata entries that hold JSON objects (safetensors metadata values are strings)
JSON_ENTRIES = ("vae_config", "var_config", "ar_config", "sampling", "class_names", "lora", "training")
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: a file in a Hub repo: ``owner/repo/file.pth`` (or ``.safetensors``), e.g. ``FoundationVision/var/var_d16.pth``
HUB_FILE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>[\w.-]+\.(?:pth|pt|safetensors))")
#: the official VAR repository and the tokenizer file every official transformer needs
OFFICIAL_REPO, OFFICIAL_TOKENIZER = "FoundationVision/var", "vae_ch160v4096z32.pth"
CARD_NAME = "README.md"
#: where named Hub files are looked for first (and where to put them by hand offline): $VARLIB_WEIGHTS
WEIGHTS_ENV = "VARLIB_WEIGHTS"
#: file kind -> the model class its files build
MODEL_CLASSES: dict[str, type[PretrainedMixin]] = {cls.FILE_KIND: cls for cls in (MultiScaleVQVAE, VAR, RasterAR)}


def model_class(kind: str | None, source: str) -> type[PretrainedMixin]:
    """The model class of a file kind; raises ValueError naming the known kinds."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"{source}: expected a varlib model kind among "
                         f"{', '.join(repr(k) for k in MODEL_CLASSES)}, got {kind!r}")
    return MODEL_CLASSES[kind]


def _transformer_prefix(model: nn.Module) -> str:
    """The weight prefix of a transformer (a model file kind other than the tokenizer)."""
    if not isinstance(model, tuple(c for k, c in MODEL_CLASSES.items() if k != "tokenizer")):
        names = " or ".join(c.__name__ for k, c in MODEL_CLASSES.items() if k != "tokenizer")
        raise ValueError(f"expected a {names}, got {type(model).__name__}")
    return model.FILE_PREFIX


def _plain_config(config: Mapping) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, storages = {}, set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage().data_ptr()
        # tied weights (a T5 encoder's input embeddings) are written once per name: safetensors refuses shared memory
        out[prefix + k] = v.clone() if storage in storages else v
        storages.add(storage)
    return out


def model_metadata(vae: PretrainedMixin, var: PretrainedMixin | None = None) -> dict[str, str]:
    """The metadata that makes a file loadable by :func:`varlib.load`: the tokenizer ``vae`` and, for a transformer
    file, the transformer ``var`` (a VAR or RasterAR). Lightning modules store it in their checkpoints under
    ``checkpoint["varlib"]`` (with weights under ``vae.`` and ``var.`` or ``ar.``)."""
    meta = {"format": FORMAT, "kind": vae.FILE_KIND, "vae_config": json.dumps(_plain_config(vae.config))}
    if var is not None:
        prefix = _transformer_prefix(var)
        meta.update({"kind": var.FILE_KIND, f"{prefix}_config": json.dumps(_plain_config(var.config)),
                     "sampling": json.dumps(asdict(var.sampling))})
        if var.class_names is not None:
            meta["class_names"] = json.dumps(list(var.class_names))
    return meta


def save_tokenizer(vae: PretrainedMixin, path: str | os.PathLike) -> None:
    """Writes a tokenizer to a ``.safetensors`` file that :func:`varlib.load` turns back into a MultiScaleVQVAE."""
    save_file(_tensors("", vae.state_dict()), os.fspath(path), metadata=model_metadata(vae))


def save_var(var: PretrainedMixin, path: str | os.PathLike) -> None:
    """Writes a VAR (or the raster-AR baseline) together with its tokenizer to one ``.safetensors`` file."""
    prefix = _transformer_prefix(var) + "."
    state = {**_tensors("vae.", var.vae.state_dict()), **_tensors(prefix, var.state_dict())}
    save_file(state, os.fspath(path), metadata=model_metadata(var.vae, var))


def save_pretrained(model: PretrainedMixin, directory: str | os.PathLike, training: Mapping | None = None,
                    license: str = "mit") -> Path:
    """Writes ``directory/model.safetensors`` (as :func:`save_var` / :func:`save_tokenizer`),
    ``directory/config.json`` (format, kind, the constructor configs and, for a transformer, its sampling settings)
    and the model card ``directory/README.md`` (:func:`model_card`; ``training`` describes the run).

    The folder is what :func:`from_pretrained` reads and what a Hugging Face Hub model repo holds. Returns the
    folder.
    """
    if not isinstance(model, tuple(MODEL_CLASSES.values())):
        names = ", ".join(c.__name__ for c in MODEL_CLASSES.values())
        raise ValueError(f"expected one of {names}, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.FILE_KIND == "tokenizer":
        save_tokenizer(model, directory / WEIGHTS_NAME)
        meta = model_metadata(model)
    else:
        save_var(model, directory / WEIGHTS_NAME)
        meta = model_metadata(model.vae, model)
    config = {k: json.loads(v) if k in JSON_ENTRIES else v for k, v in meta.items()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (directory / CARD_NAME).write_text(model_card(model, training, license))
    return directory


def _count(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def model_card(model: PretrainedMixin, training: Mapping | None = None, license: str = "mit") -> str:
    """The Hub model card (README.md with YAML front matter) of a varlib model: architecture and parameter counts,
    tokenizer, classes, training data and steps and the metrics the run recorded (``training``: any of ``data``,
    ``steps``, ``init_from``, ``metrics`` (name -> value), ``command``), sampling settings, licence and usage."""
    training = dict(training or {})
    tokenizer = model if model.FILE_KIND == "tokenizer" else model.vae
    name = type(model).__name__
    lines = ["---", f"license: {license}", "library_name: varlib", "tags:", "- varlib", "- image-generation",
             f"- {model.FILE_KIND}", "---", "", f"# {name} (varlib)", ""]
    if model.FILE_KIND == "tokenizer":
        lines += [f"A multi-scale VQ tokenizer ({_count(model)} parameters): vocabulary {model.vocab_size}, "
                  f"{model.z_channels} code channels, schedule {list(model.patch_nums)} "
                  f"({model.patch_nums[-1] * model.downsample} px images).", ""]
    else:
        extra = (f", {model.num_non_embedding_params():,} without embeddings"
                 if hasattr(model, "num_non_embedding_params") else "")
        kind, condition = model.conditioning.describe()
        lines += [f"A {kind} {name} transformer: depth {model.depth}, width {model.width}, "
                  f"{model.num_heads} heads, {condition}, {_count(model)} parameters{extra}; "
                  f"schedule {list(model.patch_nums)}.", "",
                  f"Tokenizer (in the same file): {_count(tokenizer)} parameters, vocabulary {tokenizer.vocab_size}, "
                  f"{tokenizer.z_channels} code channels, {tokenizer.patch_nums[-1] * tokenizer.downsample} px.", ""]
        if model.class_names:
            shown = ", ".join(model.class_names[:20]) + (" ..." if len(model.class_names) > 20 else "")
            lines += [f"Classes: {shown}", ""]
        lines += [f"Sampling settings (the defaults of `generate`): cfg {model.sampling.cfg}, top_k "
                  f"{model.sampling.top_k}, top_p {model.sampling.top_p}.", ""]
    lines += ["## Training", ""]
    described = [(key, training.get(key)) for key in ("data", "steps", "init_from", "command")]
    lines += [f"- {key}: {value}" for key, value in described if value is not None] or ["- not recorded"]
    if training.get("metrics"):
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in sorted(training["metrics"].items())]
    if model.FILE_KIND == "tokenizer":
        usage = "vae = varlib.load(\"user/model\")  # or the local folder"
    else:
        usage = ("var = varlib.load(\"user/model\")  # or the local folder\n"
                 f"images = var.generate({model.conditioning.EXAMPLE}, seed=0)  # (2, 3, H, W) in [0, 1]")
    lines += ["", "## Use", "", "```python", "import varlib", "", usage, "```", "",
              f"Licence: {license}.", ""]
    return "\n".join(lines)


def push_to_hub(model: PretrainedMixin, repo_id: str, training: Mapping | None = None, license: str = "mit",
                private: bool = False, token: str | None = None, endpoint: str | None = None,
                commit_message: str = "Upload varlib model") -> str:
    """Writes :func:`save_pretrained`'s folder (weights, config, model card) to a temporary folder and uploads it
    to the Hub model repo ``repo_id`` (created when missing) with ``huggingface_hub``; returns the commit URL.
    ``endpoint`` (default: the Hub, or ``HF_ENDPOINT``) points elsewhere, e.g. a private Hub."""
    import tempfile

    try:
        from huggingface_hub import HfApi  # optional dependency (varlib[hub])
    except ImportError:
        raise ImportError("push_to_hub needs the huggingface_hub package: pip install 'varlib[hub]'") from None
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, training, license)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(commit.commit_url)


def weights_dir() -> Path:
    """Where named Hub files are looked for before downloading: ``$VARLIB_WEIGHTS`` (default
    ``~/.cache/varlib/weights``), as ``<dir>/<owner>/<repo>/<file>``."""
    return Path(os.environ.get(WEIGHTS_ENV) or Path.home() / ".cache" / "varlib" / "weights")


def hub_file(name: str, revision: str | None = None) -> Path:
    """The local path of a named Hub file ``owner/repo/file`` (:data:`HUB_FILE`): ``weights_dir()/owner/repo/file``
    when it is there, else downloaded with ``huggingface_hub`` (its cache). Offline, or without the package, the
    error says which file to fetch and where to put it."""
    match = HUB_FILE.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r}: expected a Hub file name 'owner/repo/file.pth' (e.g. "
                         f"'{OFFICIAL_REPO}/var_d16.pth')")
    local = weights_dir() / name
    if local.is_file():
        return local
    url = f"https://huggingface.co/{match['repo']}/resolve/{revision or 'main'}/{match['file']}"
    advice = f"download {url} and put it at {local} (or set {WEIGHTS_ENV} to the folder that holds {name})"
    try:
        from huggingface_hub import hf_hub_download  # optional dependency (varlib[hub])
    except ImportError:
        raise FileNotFoundError(f"{name} is not on this machine and the huggingface_hub package that downloads it "
                                f"is missing (pip install 'varlib[hub]'): {advice}") from None
    try:
        return Path(hf_hub_download(match["repo"], match["file"], revision=revision))
    except Exception as error:  # huggingface_hub raises many types (offline, not found, gated, HTTP errors)
        raise FileNotFoundError(f"could not download {name} ({type(error).__name__}: {str(error)[:200]}): "
                                f"{advice}") from error


def official_tokenizer_name(name: str) -> str | None:
    """The tokenizer file beside an official transformer file name (``.../var_d16.pth`` ->
    ``.../vae_ch160v4096z32.pth``), or None for other names."""
    match = HUB_FILE.fullmatch(name)
    if match is None or not match["file"].startswith("var_"):
        return None
    return f"{match['repo']}/{OFFICIAL_TOKENIZER}"


def _split(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_model(meta: Mapping[str, str], state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """The model that ``meta`` describes (the metadata of :func:`model_metadata`), with weights from ``state``
    (tokenizer weights under ``vae.``, transformer weights under ``var.`` or ``ar.``), in eval mode on the CPU."""
    cls = model_class(meta.get("kind"), source)
    vae = MODEL_CLASSES["tokenizer"].from_config(json.loads(meta["vae_config"]), _split(state, "vae.")).eval()
    if cls is MODEL_CLASSES["tokenizer"]:
        return vae
    name = cls.FILE_PREFIX
    # files written before sampling settings existed keep the model's defaults
    sampling = json.loads(meta["sampling"]) if "sampling" in meta else None
    class_names = json.loads(meta["class_names"]) if "class_names" in meta else None
    return cls.from_config(json.loads(meta[f"{name}_config"]), _split(state, f"{name}."),
                           vae=vae.requires_grad_(False), sampling=sampling, class_names=class_names).eval()


def unreadable_file_error(path: str, error: Exception) -> ValueError:
    """The error for a damaged model file (safetensors and torch raise several types)."""
    return ValueError(f"{path}: expected a torch checkpoint or .safetensors file, got an unreadable file "
                      f"({type(error).__name__}: {error})")


def read_safetensors(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a ``.safetensors`` file on the CPU; a tokenizer file's weights get the ``vae.``
    prefix they have in transformer files. Raises ValueError for an unreadable file."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise unreadable_file_error(path, error) from error
    if meta.get("kind") == "tokenizer":
        state = {"vae." + k: v for k, v in state.items()}
    return meta, state


def read_pretrained_folder(folder: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, state dict) of a :func:`save_pretrained` folder: ``config.json`` gives the metadata."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a varlib pretrained folder: expected {path.name} "
                                    f"(written by model.save_pretrained), got nothing there")
    config = json.loads(config_path.read_text())
    meta = {k: json.dumps(v) if k in JSON_ENTRIES else v for k, v in config.items()}
    _, state = read_safetensors(os.fspath(weights_path))
    return meta, state


def from_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                    revision: str | None = None) -> nn.Module:
    """A model from a :func:`save_pretrained` folder or a Hugging Face Hub repo id (``"user/model"``).

    A local folder works offline. ``config.json`` decides the architecture and the sampling settings (edit
    it to change the recommended ones); ``model.safetensors`` gives the weights. A repo id is downloaded with
    ``huggingface_hub`` (``pip install 'varlib[hub]'``) at ``revision`` and needs the network (or the Hub
    cache); both absences raise an error that says so.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = _download(os.fspath(name_or_path), revision)
    return build_model(*read_pretrained_folder(folder), os.fspath(folder)).to(device)


def _download(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub repo's config.json and model.safetensors."""
    if os.path.isfile(repo_id):
        raise ValueError(f"{repo_id} is a file; from_pretrained takes a folder or a Hub repo id (varlib.load opens files)")
    if not HUB_REPO_ID.fullmatch(repo_id):
        raise FileNotFoundError(f"no pretrained folder at {repo_id} (and it is not a Hub repo id 'user/model')")
    try:
        from huggingface_hub import snapshot_download  # optional dependency (varlib[hub])
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local folder; downloading it as a Hub repo id needs the "
                          "huggingface_hub package (pip install 'varlib[hub]') and network access") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as error:  # huggingface_hub raises many types (offline, not found, gated, HTTP errors)
        raise OSError(f"could not download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}); "
                      "a repo id needs network access or a filled Hub cache, a local folder works offline") from error
