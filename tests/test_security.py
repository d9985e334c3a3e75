"""Untrusted checkpoints and paths: no checkpoint code ever runs, and the app serves only what it should.

* Pickles with a payload (a ``__reduce__`` that creates a marker file) in ``pytorch_model.bin`` are refused by
  ``posenc.load`` from a local folder, from the (fake) Hub and through the app; the marker never appears. Each
  payload is first shown to work when unpickled unsafely, so the tests can fail.
* A repo asking for remote code (``auto_map`` and a ``modeling_*.py``) is refused without fetching the code.
* The repo field and the model argument take Hub repo ids and folders inside ``checkpoints/`` only.
* Uploads are limited to 20 MB, nothing is shared, and only the examples folder is served from disk.
"""

from __future__ import annotations

import json
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import load_file

from bench.reliability import free_port, sample_images
from hub_server import HubServer, patched_hub_client
from posenc.hub import HubLoadError, load
from posenc.labels import CIFAR10_LABELS
from posenc.models import ViTConfig, build_model
from posenc.preprocess import Preprocess
from posenc.registry import HUB_MODELS
from posenc.app import MAX_FILE_SIZE, QUEUE_OPTIONS, Catalog, Handlers, HubStatus, ModelCache, create_demo, launch_options

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
MB = 1024 * 1024

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.filterwarnings("ignore:The value passed into gr.Dropdown"),  # use_custom's update, called directly
]


class Payload:
    """Unpickles as ``open(marker, "w")``: creates the marker file, the stand-in for any code an attacker wants."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                       labels=CIFAR10_LABELS, preprocess=Preprocess(input_size=(32, 32), crop_pct=1.0))
    build_model(config).save_pretrained(folder)
    return folder


def _write_payload(path: Path, weights: dict[str, torch.Tensor], marker: Path, fmt: str) -> None:
    """A weights file holding real tensors and the payload, as torch.save (zip or legacy) or a bare pickle."""
    state = {**weights, "pos_embed_extra": Payload(marker)}
    if fmt == "zip":
        torch.save(state, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))  # the protocol torch.save writes


def _unpickle_unsafely(path: Path) -> None:
    """What a careless loader does: ``torch.load(weights_only=False)``, or ``pickle.load`` for a bare pickle."""
    try:
        state = torch.load(path, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError):
        with path.open("rb") as f:
            state = pickle.load(f)
    state["pos_embed_extra"].close()  # the payload's return value: the marker, opened for writing


@pytest.fixture
def malicious_folder(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A model folder whose only weights are a ``pytorch_model.bin`` with a payload; returns (folder, marker).

    The payload is shown to run when the file is unpickled unsafely, then the marker is removed.
    """
    folder = _tiny_model(tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    _write_payload(folder / "pytorch_model.bin", weights, marker, request.param)
    _unpickle_unsafely(folder / "pytorch_model.bin")
    assert marker.exists(), "the payload runs when unpickled unsafely"
    marker.unlink()
    return folder, marker


PICKLE_FORMATS = ["zip", "legacy", "bare-pickle"]


@pytest.mark.parametrize("malicious_folder", PICKLE_FORMATS, indirect=True)
def test_pickle_payload_in_a_local_folder_is_refused_and_never_runs(malicious_folder) -> None:
    folder, marker = malicious_folder
    with pytest.raises(HubLoadError, match="holds more than plain tensors") as caught:
        load(str(folder))
    assert caught.value.reason == "corrupt"
    assert not marker.exists(), "the payload ran"
    assert (folder / "pytorch_model.bin").is_file(), "the user's own file is left in place"


@pytest.mark.parametrize("malicious_folder", ["zip"], indirect=True)
def test_pickle_payload_from_the_hub_is_refused_never_runs_and_is_removed_from_the_cache(
    malicious_folder, tmp_path: Path
) -> None:
    folder, marker = malicious_folder
    with HubServer() as hub, patched_hub_client(endpoint=hub.endpoint, hf_home=tmp_path / "hf"):
        hub.add_repo("attacker/model", folder)
        with pytest.raises(HubLoadError, match="holds more than plain tensors"):
            load("attacker/model")
        blob = tmp_path / "hf" / "hub" / "models--attacker--model" / "blobs" / hub.etag("attacker/model",
                                                                                      "pytorch_model.bin")
        fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET"}
    assert not marker.exists(), "the payload ran"
    assert "pytorch_model.bin" in fetched, "the file was downloaded and refused, not skipped"
    assert not blob.exists(), "the refused file does not stay in the cache"


def _remote_code_repo(folder: Path, marker: Path) -> Path:
    """A repo that asks for its own model code: ``auto_map`` plus a modeling file that creates ``marker``."""
    _tiny_model(folder)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"], "num_labels": 10,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForImageClassification": "modeling_evil.EvilModel"},
    }))  # fmt: skip
    code = f"open({str(marker)!r}, 'w')\n"
    (folder / "modeling_evil.py").write_text(code)
    (folder / "configuration_evil.py").write_text(code)
    return folder


def test_repo_asking_for_remote_code_is_refused_without_fetching_the_code(tmp_path: Path) -> None:
    marker = tmp_path / "remote-code-ran"
    folder = _remote_code_repo(tmp_path / "repo", marker)
    with HubServer() as hub, patched_hub_client(endpoint=hub.endpoint, hf_home=tmp_path / "hf"):
        hub.add_repo("attacker/remote-code", folder)
        with pytest.raises(HubLoadError, match="evil") as caught:
            load("attacker/remote-code")
        fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests}
    assert caught.value.reason == "unsupported"
    assert fetched == {"config.json"}, "only the config was fetched"
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ model sources


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: checkpoints/ with one model and a symlink to a folder outside, plus a model outside."""
    root = tmp_path_factory.mktemp("project")
    _tiny_model(root / "checkpoints" / "cifar10-learned")
    _tiny_model(root / "outside" / "model")
    (root / "checkpoints" / "escape").symlink_to(root / "outside", target_is_directory=True)
    (root / "checkpoints" / "etc").symlink_to("/etc", target_is_directory=True)
    return root


def _refused_sources(project: Path) -> list[str]:
    return [
        "../../etc",
        "/etc",
        str(project / "outside" / "model"),  # a loadable model, but outside checkpoints/
        str(project / "checkpoints" / "escape" / "model"),  # through a symlink leaving checkpoints/
        str(project / "checkpoints" / "etc"),
        str(project / "checkpoints" / ".." / "outside" / "model"),
        str(project / "checkpoints"),
        "~/models",
        "https://example.com/evil/model",
        "hf://attacker/model",
        "attacker/model; rm -rf /",
        "attacker/model/../../x",
        "a/b/c",
    ]


def _handlers(project: Path, loader) -> Handlers:
    catalog = Catalog.build(project / "checkpoints", HUB_MODELS, [])
    return Handlers(cache=ModelCache(loader), catalog=catalog, hub=HubStatus(lambda: False))


def test_repo_field_refuses_server_paths_and_urls_before_any_load(project: Path) -> None:
    photo = sample_images(project / "images", count=1)[0]

    def never(source: str):
        raise AssertionError(f"{source!r} reached the loader")

    handlers = _handlers(project, never)
    for text in _refused_sources(project):
        with pytest.raises(gr.Error, match="server paths are not accepted"):
            handlers.explore.use_custom(text)
        with pytest.raises(gr.Error, match="not a model this app may load"):
            handlers.api.predict({"path": str(photo)}, text, progress=lambda *a, **k: None)


def test_repo_field_accepts_repo_ids_and_checkpoint_folders(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    photo = sample_images(project / "images", count=1)[0]
    handlers = _handlers(project, load)
    accepted = ["timm/deit_tiny_patch16_224.fb_in1k", "google/vit-base-patch16-224", "someone/model",
                str(project / "checkpoints" / "cifar10-learned"), "checkpoints/cifar10-learned"]
    for text in accepted:  # a bundled model keeps its public name, however it is spelled
        assert handlers.explore.use_custom(text).value == (text if text.count("/") == 1 and "checkpoints" not in text
                                                   else "cifar10-learned")
    for folder in accepted[-2:]:
        top5 = handlers.api.predict({"path": str(photo)}, folder, progress=lambda *a, **k: None)
        assert len(top5) == 5 and set(top5) <= set(CIFAR10_LABELS)


# ------------------------------------------------------------------------------------------------ the launched app


@pytest.fixture(scope="module")
def hub() -> HubServer:
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def app(project: Path, hub: HubServer, tmp_path_factory: pytest.TempPathFactory):
    """The app launched in this process with the app's launch options, its Hub client pointed at the fake Hub."""
    with patched_hub_client(endpoint=hub.endpoint, hf_home=tmp_path_factory.mktemp("hf")):
        demo = create_demo(checkpoints_dir=project / "checkpoints", registry=HUB_MODELS, examples_dir=EXAMPLES)
        port = free_port()
        demo.queue(**QUEUE_OPTIONS).launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port,
                                           quiet=True, **launch_options(EXAMPLES))
        try:
            yield demo, f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


@pytest.fixture(scope="module")
def client(app, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(app[1], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_launched_app_refuses_server_paths_as_models(client: Client, project: Path) -> None:
    photo = sample_images(project / "images", count=1)[0]
    for model in _refused_sources(project):
        with pytest.raises(AppError, match="not a model this app may load"):
            client.predict(handle_file(photo), model, None, api_name="/predict")
    result = client.predict(handle_file(photo), str(project / "checkpoints" / "cifar10-learned"), None,
                            api_name="/predict")
    assert len(result["confidences"]) == 5


@pytest.mark.parametrize("malicious_folder", ["zip"], indirect=True)
def test_launched_app_refuses_a_pickle_payload_from_the_hub_and_keeps_serving(
    client: Client, hub: HubServer, project: Path, malicious_folder
) -> None:
    folder, marker = malicious_folder
    hub.add_repo("attacker/pickled", folder)
    photo = sample_images(project / "images", count=1)[0]
    with pytest.raises(AppError, match="holds more than plain tensors"):
        client.predict(handle_file(photo), "attacker/pickled", None, api_name="/predict")
    assert not marker.exists(), "the payload ran"
    result = client.predict(handle_file(photo), str(project / "checkpoints" / "cifar10-learned"), None,
                            api_name="/predict")
    assert len(result["confidences"]) == 5


def test_launch_options_share_nothing_limit_uploads_and_serve_only_the_examples() -> None:
    options = launch_options(EXAMPLES)
    assert options["share"] is False
    assert options["allowed_paths"] == [str(p.resolve()) for p in sorted(EXAMPLES.iterdir()) if p.suffix in (".png", ".jpg")]
    assert options["max_file_size"] == MAX_FILE_SIZE == "20mb"
    assert launch_options(None)["allowed_paths"] == []


def _status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_launched_app_shares_nothing_and_serves_no_file_outside_the_examples(app, project: Path) -> None:
    demo, url = app
    assert demo.share is False and demo.share_url is None
    assert demo.max_file_size == 20 * MB
    with urllib.request.urlopen(f"{url}config", timeout=30) as response:
        assert json.load(response)["max_file_size"] == 20 * MB
    assert _status(f"{url}gradio_api/file={EXAMPLES.resolve() / 'red_car.png'}") == 200
    for path in ("/etc/passwd", ROOT / "app.py", project / "checkpoints" / "cifar10-learned" / "config.json",
                 EXAMPLES.resolve() / "make_examples.py"):
        assert _status(f"{url}gradio_api/file={path}") == 403, path


def _multipart(name: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with one file field ``files``, as Gradio's upload route takes it."""
    boundary = "posenc-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_upload_over_the_limit_is_refused(app, client: Client, tmp_path: Path) -> None:
    _, url = app
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(21 * MB))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks the app's limit
        client.predict(handle_file(big), "someone/model", None, api_name="/predict")
    assert _status(f"{url}gradio_api/upload", *_multipart("big.png", big.read_bytes())) == 413  # a raw client
    assert _status(f"{url}gradio_api/upload", *_multipart("small.png", bytes(1000))) == 200, "under the limit"
