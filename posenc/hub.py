"""Load an image classifier from the Hugging Face Hub or a local folder: ``posenc.load(source)``.

Three layouts are understood, told apart by ``config.json`` (see :func:`posenc.convert.detect_layout`):
timm (``config.json`` + ``model.safetensors``), transformers (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, optional ``preprocessor_config.json``) and posenc's own ``save_pretrained``
output. Only those files are fetched, through ``huggingface_hub.hf_hub_download`` and its cache.
Weights are read as plain tensors only: safetensors, or ``torch.load(weights_only=True)``; no
checkpoint code ever runs.

Every failure surfaces as :class:`HubLoadError`, whose message names the source and says what to do.
A model that is cached loads with the Hub unreachable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from posenc.convert import (
    CheckpointMismatchError,
    UnsupportedModelError,
    check_state_dict,
    config_from_timm,
    config_from_transformers,
    convert_state_dict,
    detect_layout,
)
from posenc.labels import pick_labels
from posenc.models import PosencModel, build_model
from posenc.preprocess import ImageSource, Preprocess, build_transform, load_image

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
PREPROCESSOR_FILE = "preprocessor_config.json"
OFFLINE_HINT = "connect to the internet or pick a bundled model"
#: Raw transport errors huggingface_hub lets through while a download is under way.
_TRANSPORT_ERRORS = (httpx2.TransportError,)
#: What one model may cost, each changed by the environment variable of the same name: learned parameters
#: (the largest curated model has 87 million; ViT-L has 304 million), submodules (which bound the depth;
#: the curated ViT-B has 164) and the bytes one inspection at the checkpoint's input size returns (attention
#: maps and position tensors; 45 MB for ViT-B/16 at 224x224, 6.9 GiB for the largest curated one, SAM's ViT-B
#: encoder at its own 1024x1024, whose global blocks attend over 4,096 tokens; the app runs it at smaller sizes).
DEFAULT_LIMITS = {"POSENC_MAX_PARAMS": 400_000_000, "POSENC_MAX_MODULES": 2048, "POSENC_MAX_INSPECT_BYTES": 8 * 2**30}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class HubLoadError(RuntimeError):
    """A model could not be loaded; the message names the source and says what to do.

    Attributes:
        source: the repo id or folder that was asked for.
        reason: a short machine-readable cause: "invalid_source", "offline", "not_found", "gated",
            "revision", "missing_file", "unsupported", "invalid_config", "corrupt", "mismatch",
            "too_large", "network" or "io".
    """

    def __init__(self, message: str, *, source: str, reason: str) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class LoadedModel:
    """A loaded classifier in eval mode with everything needed to run it on an image.

    Attributes:
        model: the posenc model (``model.inspect(pixels)`` gives every position tensor).
        preprocess: the checkpoint's own evaluation preprocessing.
        labels: one name per class.
        source: the repo id or folder it came from.
        layout: "posenc", "timm" or "transformers".
        num_params: learned parameters.
    """

    model: PosencModel
    preprocess: Preprocess
    labels: list[str]
    source: str
    layout: str
    num_params: int

    def pixels(self, image: ImageSource, input_size: tuple[int, int] | None = None) -> Tensor:
        """The model's input for one image.

        Args:
            image: a path, bytes, PIL image or array (anything :func:`posenc.preprocess.load_image` takes).
            input_size: (h, w) to run at another resolution; None uses the checkpoint's size.

        Returns:
            (1, 3, h, w) float32 on the model's device.
        """
        pp = self.preprocess if input_size is None else replace(self.preprocess, input_size=tuple(input_size))
        x = build_transform(pp)(load_image(image))  # 3, h, w
        return x[None].to(self._device())  # 1, 3, h, w

    @property
    def headless(self) -> bool:
        """True for a checkpoint without a classifier (DINOv2, SigLIP towers): ``model(x)`` gives pooled features."""
        return self.model.headless

    def predict(self, image: ImageSource, top_k: int = 5) -> list[Prediction]:
        """The ``top_k`` most probable classes of one image, most probable first; [] for a headless model."""
        return self.predict_batch([image], top_k=top_k)[0]

    def predict_batch(self, images: Sequence[ImageSource], top_k: int = 5) -> list[list[Prediction]]:
        """Top-k classes of several images in one forward pass.

        Args:
            images: B image sources.
            top_k: classes per image (capped at the number of classes).

        Returns:
            B lists of ``top_k`` predictions, most probable first; empty lists for a headless model, which has no
            classes to predict (run ``model(pixels)`` for its pooled features).
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if not images:
            return []
        if self.headless:
            logger.info("%s has no classifier head (headless): no predictions", self.source)
            return [[] for _ in images]
        transform = build_transform(self.preprocess)
        x = torch.stack([transform(load_image(image)) for image in images]).to(self._device())  # B, 3, h, w
        with torch.inference_mode():
            probs = self.model(x).float().softmax(dim=-1)  # B, num_classes
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # B, k
        return [
            [Prediction(int(i), self.labels[int(i)], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


# ---------------------------------------------------------------------------------------------- sources


def is_safe_source(source: str, allowed_dirs: Sequence[str | os.PathLike[str]]) -> bool:
    """Whether the app may load ``source``: a Hub repo id, or a folder inside one of ``allowed_dirs``.

    An existing folder counts only when it resolves inside an allowed directory (which is how
    :func:`load` would treat it); paths with ``..``, absolute paths elsewhere and strings that are not
    valid repo ids are refused.
    """
    if not isinstance(source, str):
        return False
    folder = _existing_folder(source)
    if folder is not None:
        resolved = folder.resolve()
        return ".." not in folder.parts and any(
            resolved != root and root in resolved.parents for root in (Path(d).resolve() for d in allowed_dirs)
        )
    return _is_repo_id(source)


def _existing_folder(source: str) -> Path | None:
    """``source`` as a path when it names an existing directory (never for "", which would mean ".")."""
    if not source.strip() or "\x00" in source:
        return None
    try:
        return Path(source) if Path(source).is_dir() else None
    except (OSError, ValueError):  # e.g. a name too long for the file system
        return None


def _is_repo_id(source: str) -> bool:
    """Whether ``source`` follows the Hub's repo-id rules (``name`` or ``org/name``, no ``..`` or ``--``)."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


class _Files:
    """Fetches a checkpoint's files from a local folder or the Hub, turning every failure into HubLoadError."""

    def __init__(self, source: str, *, revision: str | None, local_files_only: bool) -> None:
        self.source = source
        self.revision = revision
        self.local_files_only = local_files_only
        self.folder = _existing_folder(source)
        if self.folder is None:
            if not _is_repo_id(source):
                raise HubLoadError(
                    f"{source!r} is neither an existing folder nor a valid Hub repo id; "
                    "pass a folder holding config.json and the weights, or a repo id like 'timm/deit_tiny_patch16_224.fb_in1k'",
                    source=source,
                    reason="invalid_source",
                )
        elif revision is not None:
            logger.warning("ignoring revision=%r for the local folder %s", revision, source)

    @property
    def where(self) -> str:
        return f"the folder {self.source}" if self.folder is not None else f"the Hub repo {self.source}"

    def get(self, filename: str) -> Path:
        """The local path of a required file."""
        if self.folder is None:
            return self._download(filename)
        path = self.folder / filename
        if not path.is_file():
            raise HubLoadError(
                f"{self.where} has no {filename}; a model folder needs config.json and model.safetensors "
                "(or pytorch_model.bin) as written by timm, transformers or posenc's save_pretrained",
                source=self.source,
                reason="missing_file",
            )
        return path

    def optional(self, filename: str) -> Path | None:
        """The local path of a file that may be absent, or None when the repo does not have it.

        Offline, a file counts as absent only when the cache recorded that the repo lacks it.
        """
        try:
            return self.get(filename)
        except HubLoadError as error:
            if error.reason == "missing_file" or (error.reason == "offline" and self._known_missing(filename)):
                return None
            raise

    def _known_missing(self, filename: str) -> bool:
        """Whether the Hub cache recorded that the repo has no ``filename`` (its ``.no_exist`` marker)."""
        cached = try_to_load_from_cache(self.source, filename, revision=self.revision)
        return cached is not None and not isinstance(cached, str)

    def weights(self) -> Path:
        """The first available file of :data:`WEIGHT_FILES`."""
        for filename in WEIGHT_FILES:
            path = self.optional(filename)
            if path is not None:
                return path
        raise HubLoadError(
            f"{self.where} has neither {' nor '.join(WEIGHT_FILES)}; posenc reads only these weight files "
            "(pick a repo that has them)",
            source=self.source,
            reason="missing_file",
        )

    def evict(self, path: Path) -> None:
        """Delete a bad cached download (the snapshot link and its blob) so the next load fetches it again."""
        if self.folder is not None:
            return  # never delete the user's own files
        blob = path.resolve()
        for target in (path, blob):
            try:
                target.unlink(missing_ok=True)
            except OSError as error:
                logger.warning("could not delete the corrupt cached file %s: %s", target, error)
        logger.info("deleted the corrupt cached copy of %s from %s", path.name, self.source)

    def _download(self, filename: str) -> Path:
        try:
            try:
                return Path(self._hf_download(filename, self.local_files_only))
            except _TRANSPORT_ERRORS as error:
                if self.local_files_only:
                    raise
                logger.warning("%s: %s from the Hub failed (%r); trying the local cache", self.source, filename, error)
                try:
                    return Path(self._hf_download(filename, True))
                except LocalEntryNotFoundError:
                    raise error from None
        except Exception as error:
            explained = self._explain(filename, error)
            if explained is None:
                raise
            raise explained from error

    def _hf_download(self, filename: str, local_only: bool) -> str:
        return hf_hub_download(
            self.source, filename, revision=self.revision, local_files_only=local_only, library_name="posenc"
        )

    def _explain(self, filename: str, error: Exception) -> HubLoadError | None:
        """The HubLoadError that tells the user what went wrong with ``filename`` and what to do, or None."""
        repo = self.source

        def fail(message: str, reason: str) -> HubLoadError:
            return HubLoadError(message, source=repo, reason=reason)

        if isinstance(error, GatedRepoError):
            return fail(
                f"{repo} is a gated repo: accept its terms on the Hub page {hf_constants.ENDPOINT}/{repo} "
                "and log in with `hf auth login`, then try again",
                "gated",
            )
        if isinstance(error, RepositoryNotFoundError):
            return fail(
                f"{repo} was not found on the Hub: check the repo id (org/name); if it is private, "
                "log in with `hf auth login`",
                "not_found",
            )
        if isinstance(error, RevisionNotFoundError):
            return fail(f"{repo} has no revision {self.revision!r}; pass an existing branch, tag or commit", "revision")
        if isinstance(error, LocalEntryNotFoundError):
            status = _server_error_status(error)
            if status is not None:  # the Hub answered, with an error of its own, until the retries ran out
                return fail(f"the Hub answered HTTP {status} (a server error) for {filename} of {repo}; "
                            "try again later, or pick a bundled model", "network")
            if self.local_files_only:
                offline = " (local_files_only=True: allow downloads to fetch it)"
            elif hf_constants.HF_HUB_OFFLINE:
                offline = " (HF_HUB_OFFLINE is set: unset it to download)"
            else:
                offline = ""
            return fail(
                f"{repo} is not in the local cache and the Hub cannot be reached; {OFFLINE_HINT}{offline}", "offline"
            )
        if isinstance(error, EntryNotFoundError):
            return fail(
                f"{repo} has no {filename}; posenc needs config.json and model.safetensors (or pytorch_model.bin) "
                "as written by timm, transformers or posenc: pick a repo in that layout",
                "missing_file",
            )
        if isinstance(error, _TRANSPORT_ERRORS) or (isinstance(error, OSError) and "Consistency check" in str(error)):
            return fail(
                f"the download of {filename} from {repo} was interrupted or timed out ({type(error).__name__}); "
                "check your connection and try again",
                "network",
            )
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else "?"
            return fail(f"the Hub answered HTTP {status} for {filename} of {repo}; try again later", "network")
        if isinstance(error, OSError):
            return fail(
                f"could not store {filename} of {repo} in the Hub cache ({error}); "
                "check the free disk space and the permissions of HF_HOME",
                "io",
            )
        return None


def _server_error_status(error: BaseException) -> int | None:
    """The 5xx status behind ``error`` when huggingface_hub gave up after the Hub answered with server errors."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
        if response is not None and response.status_code >= 500:
            return response.status_code
        cause = cause.__cause__ or cause.__context__
    return None


# ---------------------------------------------------------------------------------------------- loading


def _read_json(files: _Files, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        files.evict(path)
        raise HubLoadError(
            f"{path.name} of {files.source} is not valid JSON ({error}); try again, or report the broken file to the repo owner",
            source=files.source,
            reason="corrupt",
        ) from error
    if not isinstance(data, dict):
        raise HubLoadError(
            f"{path.name} of {files.source} is not a JSON object; it is not a model config",
            source=files.source,
            reason="invalid_config",
        )
    return data


def _read_weights(files: _Files, path: Path) -> dict[str, Tensor]:
    """Plain tensors from safetensors or a weights-only pickle; a corrupt cached file is evicted."""
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        files.evict(path)
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise HubLoadError(
            f"{path.name} of {files.source} is corrupt or truncated, or holds more than plain tensors ({detail}); "
            "the bad copy was removed from the cache: try again, and if it persists report it to the repo owner",
            source=files.source,
            reason="corrupt",
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise HubLoadError(
            f"{path.name} of {files.source} is not a flat state dict of tensors; pick a checkpoint saved with save_pretrained",
            source=files.source,
            reason="unsupported",
        )
    return state_dict


def limit(name: str) -> int:
    """A cost limit of :data:`DEFAULT_LIMITS`, from the environment variable ``name`` when it is set."""
    text = os.environ.get(name)
    if text is None:
        return DEFAULT_LIMITS[name]
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={text!r} is not a positive integer; unset it or give a count like {DEFAULT_LIMITS[name]}")
    return value


class _TooLarge(Exception):
    """A model under construction went over a limit (raised from a registration hook)."""


@contextmanager
def _construction_budget(max_params: int, max_modules: int) -> Iterator[None]:
    """Abort a model's construction in this thread as soon as it registers too many parameters or submodules.

    Global registration hooks see every module built anywhere; each counts only its own thread.
    """
    thread = threading.get_ident()
    counts = {"parameters": 0, "submodules": 0}

    def count(what: str, amount: int, cap: int) -> None:
        if threading.get_ident() != thread:
            return
        counts[what] += amount
        if counts[what] > cap:
            raise _TooLarge(f"more than {cap:,} {what}")

    handles = [
        nn.modules.module.register_module_parameter_registration_hook(
            lambda module, name, param: count("parameters", param.numel() if param is not None else 0, max_params)
        ),
        nn.modules.module.register_module_module_registration_hook(
            lambda module, name, sub: count("submodules", 1, max_modules)
        ),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _meta_model(model_config: Any, source: str) -> PosencModel:
    """The model a config describes, built on the ``meta`` device (no memory), within the parameter and depth limits."""
    max_params, max_modules = limit("POSENC_MAX_PARAMS"), limit("POSENC_MAX_MODULES")
    try:
        with _construction_budget(max_params, max_modules), torch.device("meta"):
            return build_model(model_config)
    except _TooLarge as error:
        raise HubLoadError(
            f"{source} is too large to serve: its config.json describes a model with {error} "
            f"(limits: {max_params:,} parameters, {max_modules:,} submodules; raise POSENC_MAX_PARAMS or "
            "POSENC_MAX_MODULES to allow it); pick a smaller model",
            source=source,
            reason="too_large",
        ) from None


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in an inspection record (dataclasses, lists, dicts), shared ones counted each time."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _check_inspection_cost(model: PosencModel, source: str) -> None:
    """Run one inspection on the meta device at the checkpoint's input size; refuse it beyond the byte limit."""
    cap = limit("POSENC_MAX_INSPECT_BYTES")
    model.eval()  # as it will run: batch norms (LeViT) use their running statistics
    size = tuple(model.config.preprocess.input_size)
    pixels = torch.empty(1, model.config.in_chans, *size, device="meta")  # 1, 3, h, w
    model.eval()  # as it will run (batch norms use their running statistics)
    try:
        with torch.inference_mode():
            needed = _tensor_bytes(model.inspect(pixels)) + _tensor_bytes(pixels)
    except (ValueError, RuntimeError) as error:
        raise HubLoadError(
            f"the config.json of {source} describes a model that cannot run at its own input size "
            f"{size[0]}x{size[1]} ({error}); fix the config or pick another model",
            source=source,
            reason="invalid_config",
        ) from error
    if needed > cap:
        raise HubLoadError(
            f"{source} is too large to serve: one inspection at {size[0]}x{size[1]} needs {needed / 2**20:,.0f} MiB "
            f"(limit {cap / 2**20:,.0f} MiB; raise POSENC_MAX_INSPECT_BYTES to allow it); pick a smaller model",
            source=source,
            reason="too_large",
        )


def _header_tensors(files: _Files, path: Path) -> dict[str, Tensor]:
    """Meta tensors with the names, shapes and dtypes of a safetensors file's header; no data is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                part = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
            return out
    except (SafetensorError, RuntimeError, ValueError, OSError) as error:
        files.evict(path)
        raise HubLoadError(
            f"{path.name} of {files.source} is corrupt or truncated ({str(error)[:200]}); the bad copy was removed "
            "from the cache: try again, and if it persists report it to the repo owner",
            source=files.source,
            reason="corrupt",
        ) from error


def _converted(
    layout: str, weights: dict[str, Tensor], model: PosencModel, source: str, model_type: str | None
) -> dict[str, Tensor]:
    """``weights`` renamed and fitted to posenc's layout, checked key by key and shape by shape against ``model``.

    Args:
        model_type: the transformers ``model_type`` of config.json (it picks the key rules).
    """
    try:
        state_dict = convert_state_dict(layout, weights, model.config, model_type=model_type)
        check_state_dict(model, state_dict, source)
    except (CheckpointMismatchError, ValueError, RuntimeError) as error:
        message = str(error) if source in str(error) else f"{source}: {error}"
        raise HubLoadError(message, source=source, reason="mismatch") from error
    return state_dict


def load(source: str, *, revision: str | None = None, local_files_only: bool | None = None) -> LoadedModel:
    """Load a classifier from a Hub repo id or a local folder in Hub layout.

    ``config.json`` is untrusted: every field is validated as it is read (see
    :func:`posenc.models.layers.normalise_config`), the model is first built on the ``meta`` device within
    :data:`DEFAULT_LIMITS`, its parameter names and shapes are compared with the safetensors header (or
    with the tensors of a weights-only ``pytorch_model.bin``), and one inspection's cost is measured on
    ``meta``. Only then is memory allocated and the model materialised.

    Args:
        source: ``"org/name"`` on the Hub, or a folder holding ``config.json`` and the weights (an existing
            folder wins over a repo id spelled the same; the app should vet sources with :func:`is_safe_source`).
        revision: branch, tag or commit on the Hub (ignored for folders).
        local_files_only: use only the local cache; None or False also downloads (the
            ``HF_HUB_OFFLINE`` environment variable still forbids it).

    Returns:
        The model in eval mode with its preprocessing and labels.

    Raises:
        HubLoadError: for every known failure, with a message that says what to do.
    """
    files = _Files(source, revision=revision, local_files_only=bool(local_files_only))
    config = _read_json(files, files.get(CONFIG_FILE))
    try:
        layout = detect_layout(config)
        if layout == "transformers":
            preprocessor_path = files.optional(PREPROCESSOR_FILE)
            preprocessor = _read_json(files, preprocessor_path) if preprocessor_path is not None else None
            model_config = config_from_transformers(config, preprocessor)
        elif layout == "timm":
            model_config = config_from_timm(config)
        else:
            model_config = config
        meta = _meta_model(model_config, source)
    except UnsupportedModelError as error:
        raise HubLoadError(
            f"{source} cannot be loaded: {error}. Pick a model of a supported architecture",
            source=source,
            reason="unsupported",
        ) from error
    except (ValueError, TypeError, KeyError, ArithmeticError, RecursionError) as error:
        raise HubLoadError(
            f"the config.json of {source} is invalid ({type(error).__name__}: {error}); "
            "fix the config or pick another model",
            source=source,
            reason="invalid_config",
        ) from error

    weights_path = files.weights()
    model_type = config.get("model_type")
    if weights_path.suffix == ".safetensors":
        _converted(layout, _header_tensors(files, weights_path), meta, source, model_type)
        _check_inspection_cost(meta, source)
        raw = _read_weights(files, weights_path)
    else:  # a pickle's shapes are known only once its (weights-only) load is done
        raw = _read_weights(files, weights_path)
        _converted(layout, {k: v.to("meta") for k, v in raw.items()}, meta, source, model_type)
        _check_inspection_cost(meta, source)
    state_dict = _converted(layout, raw, meta, source, model_type)
    model = build_model(meta.config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    cfg = model.config
    labels = pick_labels(
        cfg.num_classes,
        posenc_labels=cfg.labels if layout == "posenc" else None,
        label_names=cfg.labels if layout == "timm" else None,
        id2label=config.get("id2label") if layout == "transformers" else None,
    )
    loaded = LoadedModel(
        model=model,
        preprocess=cfg.preprocess,
        labels=labels,
        source=source,
        layout=layout,
        num_params=model.num_params(),
    )
    logger.debug("loaded %s (%s layout, %s, %d parameters)", source, layout, model.mechanisms, loaded.num_params)
    return loaded
