"""A hostile config.json (posenc, timm or transformers layout) ends in one HubLoadError, fast, before any allocation.

The fuzz runs in a subprocess (``tests/hostile_configs.py``) under an address-space limit, so a regression
that tries to allocate what a config asks for fails the test instead of the machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import torch

import posenc.hub
from hostile_configs import edited, edits_for, numeric_paths
from posenc.hub import HubLoadError, load
from posenc.models import ARCHITECTURES, SwinConfig, ViTConfig, build_model
from posenc.models.layers import normalise_config
from posenc.preprocess import Preprocess

pytestmark = pytest.mark.timeout(300)
HERE = Path(__file__).resolve().parent
TINY_PP = Preprocess(input_size=(32, 32), crop_pct=1.0)
MAX_SECONDS = 3.0
MAX_RSS_GROWTH_MB = 100.0


def _posenc_folder(folder: Path, config: Any) -> Path:
    torch.manual_seed(0)
    build_model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per layout: posenc ViT and Swin, timm (``model_args``), transformers."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hostile")
    out = {
        "posenc-vit": _posenc_folder(root / "vit", ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                              num_classes=10, preprocess=TINY_PP)),
        "posenc-swin": _posenc_folder(root / "swin", SwinConfig(img_size=32, patch_size=2, embed_dim=16, depths=(1, 1),
                                                                 num_heads=(2, 4), window_size=4, num_classes=10,
                                                                 preprocess=TINY_PP)),
    }
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    timm.models.save_for_hf(model, root / "timm")
    out["timm"] = root / "timm"
    hf_config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=32, patch_size=8, num_labels=3)
    transformers.ViTForImageClassification(hf_config).save_pretrained(root / "hf")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "hf")
    out["transformers"] = root / "hf"
    return out


#: The fields fuzzed per layout: every number and list a posenc config.json holds; timm's ``model_args`` and the
#: ``pretrained_cfg`` sizes posenc reads; the transformers fields the converter reads.
def _fields(layout: str, config: dict[str, Any]) -> list[tuple[str, ...]]:
    if layout.startswith("posenc"):
        return numeric_paths(config) + [("labels",)]
    if layout == "timm":
        # model_args.num_classes is overridden by the top-level num_classes (as in timm), so it is never read
        return [("model_args", k) for k in config["model_args"] if k != "num_classes"] + [("num_classes",)] + [
            ("pretrained_cfg", k) for k in ("input_size", "crop_pct", "mean", "std")]
    return [(k,) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "image_size", "patch_size", "num_channels", "layer_norm_eps")]


@pytest.mark.parametrize("layout", ["posenc-vit", "posenc-swin", "timm", "transformers"])
def test_every_hostile_field_value_is_a_fast_hub_load_error_under_a_memory_limit(folders, layout, tmp_path):
    folder = folders[layout]
    config = json.loads((folder / "config.json").read_text())
    if layout == "posenc-vit":
        config["labels"] = [str(i) for i in range(10)]
    cases = [
        {"label": f"{'.'.join(path)}={label}", "folder": str(folder), "config": edited(config, path, value), "value": label}
        for path in _fields(layout, config)
        for label, value in edits_for(config, path)
    ]
    assert len(cases) >= 30
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run = subprocess.run([sys.executable, str(HERE / "hostile_configs.py"), str(tmp_path / "cases.json")],
                         capture_output=True, text=True, timeout=280, cwd=HERE.parent,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])})
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["case"] for r in results] == [c["label"] for c in cases]
    bad = []
    for case, result in zip(cases, results):
        allowed = ("HubLoadError", "loaded") if case["value"] == "0" else ("HubLoadError",)
        if (not result["outcome"].startswith(allowed) or result["seconds"] > MAX_SECONDS
                or result["rss_growth_mb"] > MAX_RSS_GROWTH_MB):
            bad.append(result)
        elif result["outcome"] == "HubLoadError:invalid_config" and layout.startswith("posenc"):
            field = case["label"].split("=")[0].split(".")[-1]
            if field not in result["message"]:
                bad.append({**result, "why": "the message does not name the field"})
    assert not bad, json.dumps(bad, indent=1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"embed_dim": 65536}, "too large to serve"),
        ({"depth": 100000}, "depth must be an integer from 1 to 65536, got 100000"),
        ({"depth": 3000}, "more than 2,048 submodules"),
        ({"patch_size": 0}, "patch_size must be an integer from 1 to 65536, got 0"),
        ({"num_heads": 0}, "num_heads must be an integer from 1 to 65536, got 0"),
        ({"num_heads": 3}, "num_heads=3 must divide embed_dim=32"),
        ({"img_size": [-32, -32]}, "img_size[0] must be an integer from 1 to 65536, got -32"),
        ({"img_size": [200000, 200000]}, "img_size[0] must be an integer from 1 to 65536, got 200000"),
        ({"mlp_ratio": 1e6}, "too large to serve"),
        ({"mlp_ratio": "4"}, "mlp_ratio must be a number, got '4'"),
        ({"mlp_ratio": math.nan}, "mlp_ratio must be a finite number from 0.0 to 1000000.0, got nan"),
        ({"img_size": [32]}, "img_size must be a list of 2 items, got [32]"),
        ({"pos_embed": "fourier"}, "pos_embed must be one of 'learned', 'sincos', 'none', got 'fourier'"),
        ({"patch_size": 6}, "patch_size=6 must divide img_size=32x32"),
        ({"preprocess": {"input_size": [4096, 4096], "crop_pct": 1.0}}, "one inspection at 4096x4096 needs"),
        ({"preprocess": {"input_size": [30, 30], "crop_pct": 1.0}}, "cannot run at its own input size 30x30"),
    ],
)
def test_issue_edits_fail_within_a_second_with_a_message_naming_field_value_and_rule(folders, tmp_path, edit, message):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(folders["posenc-vit"] / "model.safetensors")
    config = json.loads((folders["posenc-vit"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(HubLoadError) as caught:
        load(str(folder))
    assert message in str(caught.value)
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("POSENC_MAX_PARAMS", "1000", "more than 1,000 parameters"),
    ("POSENC_MAX_MODULES", "10", "more than 10 submodules"),
    ("POSENC_MAX_INSPECT_BYTES", "1000", "(limit 0 MiB; raise POSENC_MAX_INSPECT_BYTES"),
])
def test_cost_limits_refuse_a_model_beyond_them_and_name_the_variable(folders, monkeypatch, variable, value, reason):
    assert load(str(folders["posenc-vit"])).num_params > 1000
    monkeypatch.setenv(variable, value)
    with pytest.raises(HubLoadError) as caught:
        load(str(folders["posenc-vit"]))
    assert caught.value.reason == "too_large"
    assert reason in str(caught.value) and variable in str(caught.value)


def test_default_limits_keep_the_largest_curated_model():
    cfg = ViTConfig(embed_dim=768, depth=12, num_heads=12)  # ViT-B/16, the largest curated (87M parameters)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == 86_567_656
    assert model.num_params() < posenc.hub.DEFAULT_LIMITS["POSENC_MAX_PARAMS"]
    assert len(list(model.modules())) < posenc.hub.DEFAULT_LIMITS["POSENC_MAX_MODULES"]
    posenc.hub._check_inspection_cost(model, "vit-b")  # raises beyond the byte limit


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_config_that_does_not_fit_its_weights_is_never_materialised(folders, tmp_path, monkeypatch, weights):
    folder = tmp_path / "repo"
    folder.mkdir()
    state = posenc.hub.load_file(str(folders["posenc-vit"] / "model.safetensors"))
    if weights == "model.safetensors":
        (folder / weights).symlink_to(folders["posenc-vit"] / weights)
    else:
        torch.save(state, folder / weights)
    config = json.loads((folders["posenc-vit"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "embed_dim": 64, "num_heads": 4}))
    devices = []
    real_build = posenc.hub.build_model

    def spy(cfg):
        model = real_build(cfg)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(posenc.hub, "build_model", spy)
    with pytest.raises(HubLoadError) as caught:
        load(str(folder))
    assert caught.value.reason == "mismatch"
    assert "cls_token (1, 1, 32) in the checkpoint vs (1, 1, 64) in the model" in str(caught.value)
    assert devices == ["meta"]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_builds_on_the_meta_device_like_on_the_cpu(model_type):
    config_cls = ARCHITECTURES[model_type].config
    with torch.device("meta"):
        meta = build_model(config_cls())
    cpu = build_model(config_cls())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in cpu.state_dict().items()}
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize(("value", "rule"), [
    (0, "from 1 to 65536"), (-1, "from 1 to 65536"), (2**17, "from 1 to 65536"), (True, "must be an integer"),
    (12.0, "must be an integer"), ("12", "must be an integer"), (None, "must be an integer"),
])
def test_integer_fields_name_the_field_value_and_rule(value, rule):
    with pytest.raises(ValueError, match=rf"^depth .*{rule}.*{value!r}"[:200].replace("(", r"\(").replace(")", r"\)")):
        ViTConfig(depth=value)


def test_headless_and_zero_defaults_stay_valid():
    assert ViTConfig(num_classes=0).num_classes == 0
    assert ViTConfig(drop_path_rate=0).drop_path_rate == 0.0
    assert ViTConfig(img_size=64, patch_size=16).img_size == (64, 64)


def test_cli_reports_a_hostile_config_as_one_line_and_exit_status(folders, tmp_path, capsys):
    from posenc.cli import main

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(folders["posenc-vit"] / "model.safetensors")
    config = json.loads((folders["posenc-vit"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": 100000}))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert main(["predict", "--model", str(folder), str(image)]) != 0
    assert "depth must be an integer from 1 to 65536, got 100000" in capsys.readouterr().err


def test_a_new_config_dataclass_is_validated_from_its_annotations_without_new_code():
    @dataclass(frozen=True)
    class NewConfig:
        grid: tuple[int, int] = (14, 14)
        stages: tuple[int, ...] = field(default=(2, 2), metadata={"min_items": 1})
        registers: int = 0  # 0 is allowed because it is the default
        scale: float = field(default=1.0, metadata={"max": 10.0})
        mode: Literal["a", "b"] = "a"
        act: str = field(default="gelu", metadata={"choices": ("gelu", "relu")})

        def __post_init__(self) -> None:
            normalise_config(self)

    assert NewConfig(grid=[7, 7], stages=[1]).grid == (7, 7)
    assert NewConfig(grid=7).grid == (7, 7)
    cases = {
        "grid": ([7, 7, 7], "grid must be a list of 2 items, got [7, 7, 7]"),
        "stages": ([], "stages must be a list of 1 to 65536 items, got 0 items"),
        "registers": (-1, "registers must be an integer from 0 to 65536, got -1"),
        "scale": (math.inf, "scale must be a finite number from 0.0 to 10.0, got inf"),
        "mode": ("c", "mode must be one of 'a', 'b', got 'c'"),
        "act": ("swish", "act must be one of 'gelu', 'relu', got 'swish'"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError) as caught:
            NewConfig(**{name: value})
        assert str(caught.value) == message
