"""posenc.load through a fake Hub: first download, the cache, offline use, and every failure the Hub can produce.

Most tests run the client in this process inside ``patched_hub_client`` (which points the already
imported huggingface_hub at the fake Hub and a private cache); one runs it in a fresh interpreter
configured only through HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE, as a user's process would be.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import posenc.hub
from huggingface_hub.utils import validate_repo_id

from hub_server import HubServer, patched_hub_client, run_hub_client
from posenc.convert import config_from_timm
from posenc.hub import HubLoadError, LoadedModel, is_safe_source, load
from posenc.labels import CIFAR10_LABELS, imagenet_labels, pick_labels
from posenc.mechanisms import MECHANISMS
from posenc.models import ViTConfig, build_model
from posenc.preprocess import Preprocess
from posenc.registry import HUB_MODELS, ModelEntry, bundled_models

pytestmark = pytest.mark.timeout(60)

POSENC_REPO = "posenc-test/tiny-vit"
HF_REPO = "posenc-test/tiny-hf-vit"
TIMM_REPO = "timm/deit_tiny_patch16_224.fb_in1k"
OFFLINE_TEXT = "is not in the local cache and the Hub cannot be reached; connect to the internet or pick a bundled model"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # B, 3, H, W


@dataclass(frozen=True)
class Repo:
    """A folder served as a Hub repo, the files a load must fetch, and the logits the model gives on X."""

    repo_id: str
    folder: Path
    files: tuple[str, ...]
    logits: torch.Tensor | None


@pytest.fixture(scope="session")
def posenc_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    torch.manual_seed(0)
    config = ViTConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, labels=CIFAR10_LABELS,
        preprocess=Preprocess(input_size=(32, 32), crop_pct=1.0),
    )  # fmt: skip
    model = build_model(config).eval()
    folder = tmp_path_factory.mktemp("posenc-repo")
    model.save_pretrained(folder)
    with torch.inference_mode():
        logits = model(X)
    return Repo(POSENC_REPO, folder, ("config.json", "model.safetensors"), logits)


@pytest.fixture(scope="session")
def transformers_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A tiny transformers ViT in the Hub layout, with its weights as pytorch_model.bin (no safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2},
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    folder = tmp_path_factory.mktemp("hf-repo")
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with torch.inference_mode():
        logits = model(pixel_values=X).logits
    files = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")
    return Repo(HF_REPO, folder, files, logits)


@pytest.fixture(scope="session")
def timm_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A tiny random-weight DeiT in timm's Hub layout (``save_for_hf``): the synthetic twin of the real DeiT repo."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                              num_classes=10).eval()
    folder = tmp_path_factory.mktemp("timm-repo")
    timm.models.save_for_hf(model, folder)
    with torch.inference_mode():
        logits = model(X)
    return Repo("timm/deit_tiny_patch16_224.synthetic", folder, ("config.json", "model.safetensors"), logits)


@pytest.fixture(scope="session")
def deit_repo(shared_data: Path) -> Repo:
    folder = shared_data / "deit_tiny_patch16_224.fb_in1k"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"DeiT-Tiny weights {folder} are absent")
    return Repo(TIMM_REPO, folder, ("config.json", "model.safetensors"), None)


@pytest.fixture
def hub(posenc_repo: Repo):
    with HubServer() as server:
        server.add_repo(posenc_repo.repo_id, posenc_repo.folder)
        yield server


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def hub_load(hub: HubServer, hf_home: Path, repo_id: str, *, offline: bool = False, **options) -> LoadedModel:
    """posenc.load(repo_id) with this process's Hub client pointed at ``hub`` and the cache in ``hf_home``."""
    with patched_hub_client(endpoint=hub.endpoint, hf_home=hf_home, offline=offline):
        return load(repo_id, **options)


def hub_load_error(hub: HubServer, hf_home: Path, repo_id: str, **options) -> HubLoadError:
    with pytest.raises(HubLoadError) as caught:
        hub_load(hub, hf_home, repo_id, **options)
    assert repo_id in str(caught.value), "the message names the repo"
    assert caught.value.source == repo_id
    return caught.value


def fetched(hub: HubServer) -> set[str]:
    """The files the client asked the server for (HEAD or GET), by name."""
    return {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}


def assert_same_model(loaded: LoadedModel, repo: Repo) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(X), repo.logits, rtol=1e-4, atol=1e-5)


def test_first_download_fetches_only_the_needed_files_then_the_cache_survives_the_server_going_down(
    hub, hf_home, posenc_repo, transformers_repo
):
    hub.add_repo(transformers_repo.repo_id, transformers_repo.folder)
    for repo in (posenc_repo, transformers_repo):
        hub.reset_log()
        first = hub_load(hub, hf_home, repo.repo_id)
        assert fetched(hub) == set(repo.files)
        assert all(r.path.startswith(f"/{repo.repo_id}/resolve/main/") for r in hub.requests), "no API calls"
        assert_same_model(first, repo)

    hub.stop()
    huggingface_hub.close_session()
    for repo in (posenc_repo, transformers_repo):
        assert_same_model(hub_load(hub, hf_home, repo.repo_id), repo)


def test_loaded_models_carry_layout_mechanisms_labels_and_preprocessing(hub, hf_home, posenc_repo, transformers_repo):
    hub.add_repo(transformers_repo.repo_id, transformers_repo.folder)
    own = hub_load(hub, hf_home, posenc_repo.repo_id)
    assert (own.layout, own.model.mechanisms, own.labels) == ("posenc", ("learned",), list(CIFAR10_LABELS))
    assert own.preprocess == Preprocess(input_size=(32, 32), crop_pct=1.0)
    assert own.num_params == sum(p.numel() for p in own.model.parameters())
    hf = hub_load(hub, hf_home, transformers_repo.repo_id)
    assert (hf.layout, hf.model.mechanisms, hf.labels) == ("transformers", ("learned",), ["cat", "dog", "bird"])
    assert hf.preprocess.input_size == (32, 32) and hf.preprocess.mean == (0.5, 0.5, 0.5)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    top = hf.predict(image, top_k=5)
    assert [p.label for p in top] == [hf.labels[p.index] for p in top] and len(top) == 3
    assert [p.probability for p in top] == sorted((p.probability for p in top), reverse=True)
    assert sum(p.probability for p in top) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_real_deit_downloads_and_then_loads_with_the_server_stopped(hub, hf_home, deit_repo, shared_data):
    hub.add_repo(deit_repo.repo_id, deit_repo.folder)
    image = shared_data / "imagenet-samples" / "n01440764_tench.JPEG"
    expected = json.loads((shared_data / "imagenet-samples" / "timm_reference.json").read_text())["images"][image.name]
    first = hub_load(hub, hf_home, deit_repo.repo_id)
    assert fetched(hub) == set(deit_repo.files)
    assert [p.index for p in first.predict(image)] == expected["top5_index"]
    hub.stop()
    huggingface_hub.close_session()
    again = hub_load(hub, hf_home, deit_repo.repo_id)
    assert [p.index for p in again.predict(image)] == expected["top5_index"]


@pytest.mark.parametrize("repo_fixture", ["posenc_repo", "transformers_repo", "timm_repo"])
def test_offline_mode_loads_from_a_warm_cache_without_any_request(hub, hf_home, repo_fixture, request):
    repo = request.getfixturevalue(repo_fixture)
    hub.add_repo(repo.repo_id, repo.folder)
    hub_load(hub, hf_home, repo.repo_id)
    hub.reset_log()
    assert_same_model(hub_load(hub, hf_home, repo.repo_id, offline=True), repo)
    assert_same_model(hub_load(hub, hf_home, repo.repo_id, local_files_only=True), repo)
    assert hub.request_count == 0


def test_offline_mode_with_a_cold_cache_says_to_connect_or_pick_a_bundled_model(hub, hf_home):
    error = hub_load_error(hub, hf_home, POSENC_REPO, offline=True)
    assert OFFLINE_TEXT in str(error) and "HF_HUB_OFFLINE is set" in str(error)
    assert error.reason == "offline"
    assert hub.request_count == 0


def test_unreachable_hub_with_a_cold_cache_says_to_connect_or_pick_a_bundled_model(hub, hf_home):
    hub.stop()
    huggingface_hub.close_session()
    error = hub_load_error(hub, hf_home, POSENC_REPO)
    assert OFFLINE_TEXT in str(error)


@pytest.mark.parametrize(
    ("fault", "reason", "advice"),
    [
        ({"kind": "gated"}, "gated", "accept its terms on the Hub page"),
        ({"kind": "missing", "filename": "model.safetensors"}, "missing_file", "has neither model.safetensors nor pytorch_model.bin"),
        ({"kind": "missing", "filename": "config.json"}, "missing_file", "has no config.json"),
        ({"kind": "cut", "filename": "model.safetensors"}, "network", "interrupted or timed out"),
    ],
)
def test_hub_faults_raise_one_error_that_names_the_repo_and_says_what_to_do(hub, hf_home, fault, reason, advice):
    hub.set_fault(POSENC_REPO, **fault)
    error = hub_load_error(hub, hf_home, POSENC_REPO)
    assert error.reason == reason
    assert advice in str(error)
    if reason == "gated":
        assert "`hf auth login`" in str(error)
    if reason == "network":
        assert "try again" in str(error)


def test_unknown_repo_says_to_check_the_repo_id(hub, hf_home):
    error = hub_load_error(hub, hf_home, "posenc-test/no-such-model")
    assert error.reason == "not_found"
    assert "check the repo id" in str(error) and "hf auth login" in str(error)


def test_download_slower_than_the_timeout_says_try_again(hub, hf_home):
    hub.set_fault(POSENC_REPO, "slow", filename="model.safetensors", seconds=3, methods="GET")
    error = hub_load_error(hub, hf_home, POSENC_REPO)
    assert error.reason == "network"
    assert "interrupted or timed out (ReadTimeout)" in str(error) and "try again" in str(error)


def test_connection_dropped_with_a_warm_cache_falls_back_to_the_cache(hub, hf_home, posenc_repo):
    hub_load(hub, hf_home, POSENC_REPO)
    hub.set_fault(POSENC_REPO, "drop")
    assert_same_model(hub_load(hub, hf_home, POSENC_REPO), posenc_repo)
    assert hub.request_count > 2, "the dropped requests were made"


@pytest.mark.parametrize(
    "config",
    [
        {"architecture": "resnet50", "num_classes": 1000, "pretrained_cfg": {"input_size": [3, 224, 224]}},
        {"model_type": "convnext", "architectures": ["ConvNextForImageClassification"], "num_labels": 1000},
    ],
)
def test_unsupported_architecture_is_named_without_downloading_the_weights(hub, hf_home, tmp_path, posenc_repo, config):
    folder = tmp_path / "unsupported"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(posenc_repo.folder / "model.safetensors", folder / "model.safetensors")
    hub.add_repo("posenc-test/unsupported", folder)
    error = hub_load_error(hub, hf_home, "posenc-test/unsupported")
    assert error.reason == "unsupported"
    name = config.get("architecture") or config["model_type"]
    assert name in str(error) and "supported: timm" in str(error)
    assert fetched(hub) == {"config.json"}


def test_config_whose_shapes_do_not_match_the_weights_is_a_mismatch_naming_the_repo(hub, hf_home, tmp_path, posenc_repo):
    folder = tmp_path / "mismatch"
    shutil.copytree(posenc_repo.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_classes=7, labels=None)
    (folder / "config.json").write_text(json.dumps(config))
    hub.add_repo("posenc-test/mismatch", folder)
    error = hub_load_error(hub, hf_home, "posenc-test/mismatch")
    assert error.reason == "mismatch"
    assert "head.weight (10, 32) in the checkpoint vs (7, 32) in the model" in str(error)
    assert "config.json" in str(error)


@pytest.mark.parametrize("keep", [8, 4000])
def test_corrupt_weights_are_evicted_from_the_cache_and_a_retry_after_healing_succeeds(
    hub, hf_home, posenc_repo, keep
):
    hub.set_fault(POSENC_REPO, "truncate_file", filename="model.safetensors", nbytes=keep)
    corrupt_blob = hf_home / "hub" / "models--posenc-test--tiny-vit" / "blobs" / hub.etag(POSENC_REPO, "model.safetensors")
    pointer = hf_home / "hub" / "models--posenc-test--tiny-vit" / "snapshots" / hub.commit_sha(POSENC_REPO) / "model.safetensors"
    error = hub_load_error(hub, hf_home, POSENC_REPO)
    assert error.reason == "corrupt"
    assert "corrupt or truncated" in str(error) and "try again" in str(error)
    assert (hf_home / "hub" / "models--posenc-test--tiny-vit" / "blobs").is_dir(), "the download went to this cache"
    assert not corrupt_blob.exists() and not pointer.is_symlink() and not pointer.exists()
    offline = hub_load_error(hub, hf_home, POSENC_REPO, offline=True)
    assert offline.reason == "offline", "no corrupt copy is left for offline use"

    hub.clear_fault(POSENC_REPO)
    assert_same_model(hub_load(hub, hf_home, POSENC_REPO), posenc_repo)


@pytest.mark.slow
def test_subprocess_configured_by_environment_downloads_and_explains_a_cold_offline_cache(hub, tmp_path, posenc_repo):
    code = (
        "from posenc.hub import load, HubLoadError\n"
        f"loaded = load({POSENC_REPO!r})\n"
        "emit(layout=loaded.layout, labels=loaded.labels, params=loaded.num_params)\n"
    )
    online = hub.run_client(code, hf_home=tmp_path / "warm", timeout=60)
    assert online.ok, online.describe()
    params = sum(t.numel() for t in load_file(str(posenc_repo.folder / "model.safetensors")).values())
    assert online.values == {"layout": "posenc", "labels": list(CIFAR10_LABELS), "params": params}
    assert fetched(hub) == set(posenc_repo.files)

    cold = run_hub_client(code, endpoint=hub.endpoint, hf_home=tmp_path / "cold", offline=True, timeout=60)
    assert cold.raised("HubLoadError"), cold.describe()
    assert f"{POSENC_REPO} {OFFLINE_TEXT}" in cold.error["message"]
    assert "Traceback" not in cold.error["message"]


# ---------------------------------------------------------------------------------------------- local folders


def test_local_folder_loads_without_touching_the_hub(posenc_repo, transformers_repo, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local folder must not reach the Hub")

    monkeypatch.setattr(posenc.hub, "hf_hub_download", no_hub)
    for repo in (posenc_repo, transformers_repo):
        loaded = load(str(repo.folder))
        assert loaded.source == str(repo.folder)
        assert_same_model(loaded, repo)


def test_local_folder_without_weights_says_which_files_are_needed(tmp_path, posenc_repo):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(posenc_repo.folder / "config.json", folder / "config.json")
    with pytest.raises(HubLoadError, match="has neither model.safetensors nor pytorch_model.bin") as caught:
        load(str(folder))
    assert str(folder) in str(caught.value)


def test_corrupt_local_weights_are_reported_and_left_in_place(tmp_path, posenc_repo):
    folder = tmp_path / "corrupt"
    shutil.copytree(posenc_repo.folder, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HubLoadError, match="corrupt or truncated"):
        load(str(folder))
    assert (folder / "model.safetensors").read_bytes() == b"not a safetensors file"


@pytest.mark.parametrize("source", ["../elsewhere", "/no/such/folder", "not a repo id", "a/b/c", "org/--name", ""])
def test_a_source_that_is_neither_a_folder_nor_a_repo_id_is_refused_before_any_download(source, monkeypatch):
    monkeypatch.setattr(posenc.hub, "hf_hub_download", lambda *a, **k: pytest.fail("no download for a bad source"))
    with pytest.raises(HubLoadError, match="neither an existing folder nor a valid Hub repo id") as caught:
        load(source)
    assert caught.value.reason == "invalid_source"


@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project" / "checkpoints"
    (root / "cifar-rope").mkdir(parents=True)
    (tmp_path / "project" / "secret").mkdir()
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "project")
    return root


@pytest.mark.parametrize(
    ("source", "safe"),
    [
        ("timm/deit_tiny_patch16_224.fb_in1k", True),
        ("google/vit-base-patch16-224", True),
        ("checkpoints/cifar-rope", True),
        ("checkpoints/cifar-rope/", True),
        ("checkpoints", False),
        ("checkpoints/../secret", False),
        ("checkpoints/escape", False),
        ("secret", False),
        ("../outside", False),
        ("/etc", False),
        ("~/models", False),
        ("a/b/c", False),
        ("org/na me", False),
        ("", False),
    ],
)
def test_is_safe_source_accepts_repo_ids_and_checkpoint_folders_only(checkpoints, source, safe):
    assert is_safe_source(source, [checkpoints]) is safe


def test_is_safe_source_accepts_an_absolute_path_inside_the_checkpoints(checkpoints):
    assert is_safe_source(str(checkpoints / "cifar-rope"), [checkpoints])
    assert not is_safe_source(str(checkpoints.parent / "secret"), [checkpoints])


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_each_architecture_with_a_valid_repo_id_and_its_mechanisms():
    assert {entry.architecture for entry in HUB_MODELS} >= {"vit", "deit", "beit", "swin", "swinv2", "data2vec-vision", "sam", "convit", "levit", "tiny_vit", "eva"}
    assert len({entry.source for entry in HUB_MODELS}) == len(HUB_MODELS)
    for entry in HUB_MODELS:
        validate_repo_id(entry.source)
        assert entry.mechanisms and set(entry.mechanisms) <= set(MECHANISMS), entry.source
        assert entry.num_params > 1_000_000
        if entry.accuracy is not None:
            assert 70.0 < entry.accuracy < 90.0 and entry.dataset == "ImageNet-1k"
        if entry.source.startswith("timm/"):
            num_classes = 0 if entry.headless else 1000
            config = config_from_timm({"architecture": entry.source.split("/", 1)[1], "num_classes": num_classes})
            assert config.mechanisms == entry.mechanisms, entry.source
            if isinstance(config, ViTConfig):  # blocks are identical: count one and two, extrapolate to the depth
                one, two = (build_model(dataclasses.replace(config, depth=d)).num_params() for d in (1, 2))
                assert one + (config.depth - 1) * (two - one) == entry.num_params, entry.source


def test_bundled_models_reads_each_checkpoint_folder_config_and_metrics(tmp_path, posenc_repo):
    root = tmp_path / "checkpoints"
    shutil.copytree(posenc_repo.folder, root / "cifar-learned")
    (root / "cifar-learned" / "metrics.json").write_text(
        json.dumps({"accuracy": 0.8125, "params": 32554, "dataset": "../shared/data/cifar10-jpeg.zip"})
    )
    shutil.copytree(posenc_repo.folder, root / "b-no-metrics")
    (root / "not-a-model").mkdir()
    (root / "timm-copy").mkdir()
    (root / "timm-copy" / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))
    params = sum(t.numel() for t in load_file(str(posenc_repo.folder / "model.safetensors")).values())

    entries = bundled_models(root)
    assert [e.name for e in entries] == ["b-no-metrics", "cifar-learned"]
    no_metrics, learned = entries
    assert learned == ModelEntry("cifar-learned", str(root / "cifar-learned"), "vit", ("learned",), 32554, 81.25, "CIFAR-10")
    assert (no_metrics.num_params, no_metrics.accuracy, no_metrics.mechanisms) == (params, None, ("learned",))
    assert load(no_metrics.source).labels == list(CIFAR10_LABELS)
    assert bundled_models(tmp_path / "absent") == []


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("num_classes", "sources", "expected"),
    [
        (2, {"posenc_labels": ["a", "b"], "label_names": ["x", "y"], "id2label": {"0": "p", "1": "q"}}, ["a", "b"]),
        (2, {"label_names": ["x", "y"], "id2label": {"0": "p", "1": "q"}}, ["x", "y"]),
        (2, {"id2label": {"1": "q", "0": "p"}}, ["p", "q"]),
        (2, {"id2label": {0: "p", 1: "q"}}, ["p", "q"]),
        (2, {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}, ["class 0", "class 1"]),
        (2, {"posenc_labels": ["only one"], "label_names": ["x", "y"]}, ["x", "y"]),
        (3, {}, ["class 0", "class 1", "class 2"]),
    ],
)
def test_labels_follow_posenc_then_timm_then_transformers_then_generic(num_classes, sources, expected):
    assert pick_labels(num_classes, **sources) == expected


def test_a_thousand_classes_without_names_get_the_imagenet_names():
    names = pick_labels(1000, id2label={str(i): f"LABEL_{i}" for i in range(1000)})
    assert names == imagenet_labels()
    assert (len(names), names[0], names[207], names[999]) == (1000, "tench", "golden retriever", "toilet tissue")
    assert CIFAR10_LABELS[:3] == ("airplane", "automobile", "bird") and len(CIFAR10_LABELS) == 10
