"""Checkpoints: fetch, recognise, convert at the edge, strict-load; and deterministic random init.

Official files are plain state dicts (dinov2/dino hub, BoQ hubconf and torchvision all call
load_state_dict on what torch.load returns), so wrapped files ({'model': ...}) are refused with
a hint rather than guessed at. Layouts (presets.Weights.layout):

- dinov2:  DINOv2 hub files; ViT-G's SwiGLU is mlp.w12/mlp.w3 there, mlp.fc1/fc2 inside.
- dino:    DINO v1 hub files (no mask_token, no LayerScale).
- boq-dinov2 / boq-resnet50: BoQ release files; this module handles their backbone.* part
  (backbone.dino.* / backbone.net.*), the aggregator.* part belongs to the BoQ head.
- torchvision-resnet50: torchvision ImageNet files (conv1..layer4, fc); the trunk loads its stages.
"""

from __future__ import annotations

import functools
import http.client
import math
import pickle
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ConfigError, WeightsError
from vpr_edge.lazy import lazy_import
from vpr_edge.presets import Backbone, Weights

torch = lazy_import("torch")
nn = torch.nn

LAYOUTS = ("dinov2", "dino", "boq-dinov2", "boq-resnet50", "torchvision-resnet50")
_VIT_LAYOUTS = ("dinov2", "dino", "boq-dinov2")
_BOQ_PREFIX = {"boq-dinov2": ("backbone.dino.", "dino."), "boq-resnet50": ("backbone.net.", "net.")}
_FAMILY = {"dinov2": "dinov2", "dino": "dino", "boq-dinov2": "dinov2", "boq-resnet50": "resnet",
           "torchvision-resnet50": "resnet"}
_TV_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_MAX_LISTED = 5


# ---------------------------------------------------------------------------------------------
# Layouts: recognise by keys, convert both ways
# ---------------------------------------------------------------------------------------------


def default_layout(spec: Backbone) -> str:
    """Layout of the spec's own checkpoint, else the natural one for its family."""
    if spec.weights is not None:
        return spec.weights.layout
    return {"dinov2": "dinov2", "dino": "dino", "resnet": "boq-resnet50"}[spec.family]


def detect_layout(sd: Mapping[str, Any]) -> str | None:
    """Which official checkpoint this looks like (STYLE #2: mask_token means DINOv2, ...)."""
    if "backbone.dino.cls_token" in sd:
        return "boq-dinov2"
    if "backbone.net.0.weight" in sd:
        return "boq-resnet50"
    if "mask_token" in sd:
        return "dinov2"
    if "cls_token" in sd and "pos_embed" in sd:
        return "dino"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "torchvision-resnet50"
    return None


def _check_layout_name(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown weights layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _vit_from_official(key: str) -> str:
    return re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key))


def _glu_blocks(sd: Mapping[str, Any], prefix: str) -> set[str]:
    """Blocks whose MLP is packed SwiGLU: fc1 is twice as wide as fc2's input."""
    out = set()
    for k, v in sd.items():
        m = re.match(rf"^{re.escape(prefix)}(blocks\.\d+\.mlp\.)fc1\.weight$", k)
        fc2 = sd.get(f"{prefix}{m.group(1)}fc2.weight") if m else None
        if fc2 is not None and v.shape[0] == 2 * fc2.shape[1]:
            out.add(m.group(1))
    return out


def _vit_to_official(key: str, glu: set[str]) -> str:
    m = re.match(r"^(blocks\.\d+\.mlp\.)(fc1|fc2)\.", key)
    if m and m.group(1) in glu:
        return f"{m.group(1)}{'w12' if m.group(2) == 'fc1' else 'w3'}.{key[m.end():]}"
    return key


def from_official(sd: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """Official keys -> internal module keys (for BoQ files: the backbone part only)."""
    _check_layout_name(layout)
    out: dict[str, Any] = {}
    off, internal = _BOQ_PREFIX.get(layout, ("", ""))
    for k, v in sd.items():
        if off and not k.startswith(off):
            continue
        key = k[len(off):]
        if layout in _VIT_LAYOUTS:
            key = _vit_from_official(key)
        elif layout == "torchvision-resnet50":
            head, _, rest = key.partition(".")
            key = f"net.{_TV_STAGES.index(head)}.{rest}" if head in _TV_STAGES else key
        out[internal + key] = v
    return out


def to_official(sd: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """Internal module keys -> official keys (inverse of from_official)."""
    _check_layout_name(layout)
    off, internal = _BOQ_PREFIX.get(layout, ("", ""))
    glu = _glu_blocks(sd, internal) if layout in _VIT_LAYOUTS else set()
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if internal and not k.startswith(internal):
            raise ConfigError(f"key {k!r} is not under {internal!r}; expected the BoQ backbone module's state dict")
        key = k[len(internal):]
        if layout in _VIT_LAYOUTS:
            key = _vit_to_official(key, glu)
        elif layout == "torchvision-resnet50":
            m = re.match(r"^net\.(\d+)\.(.*)$", key)
            key = f"{_TV_STAGES[int(m.group(1))]}.{m.group(2)}" if m else key
        out[off + key] = v
    return out


# ---------------------------------------------------------------------------------------------
# Models per layout and their official key layout
# ---------------------------------------------------------------------------------------------


def build_for_layout(spec: Backbone, layout: str, num_blocks: int | None = None):
    """The internal module a checkpoint of `layout` loads into (random-initialised by torch)."""
    _check_layout_name(layout)
    if _FAMILY[layout] != spec.family:
        raise ConfigError(f"weights layout {layout!r} is for {_FAMILY[layout]} backbones, {spec.arch} is {spec.family}")
    from vpr_edge.models.boq_backbones import BoQDinoV2, BoQResNet
    from vpr_edge.models.vit import VisionTransformer

    if layout == "boq-dinov2":
        if num_blocks not in (None, spec.depth):
            raise ConfigError("BoQ's DINOv2 backbone runs all blocks; num_blocks does not apply")
        return BoQDinoV2(spec)
    if layout in ("boq-resnet50", "torchvision-resnet50"):
        return BoQResNet(spec)
    return VisionTransformer(spec, num_blocks=num_blocks)


@functools.lru_cache(maxsize=32)
def _official_layout(spec: Backbone, layout: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from vpr_edge.models.resnet import TorchvisionResNet

    with torch.device("meta"):
        if layout == "torchvision-resnet50":
            sd = TorchvisionResNet(spec).state_dict()
        else:
            sd = to_official(build_for_layout(spec, layout).state_dict(), layout)
    return tuple((k, tuple(v.shape)) for k, v in sd.items())


def official_layout(spec: Backbone, layout: str | None = None) -> dict[str, tuple[int, ...]]:
    """{official key: shape} of the full model (for BoQ: its backbone.* part), built on `meta`."""
    layout = layout or default_layout(spec)
    _check_layout_name(layout)
    return dict(_official_layout(spec, layout))


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s)) or "scalar"


def _listed(items: list[str]) -> str:
    more = f", ... (+{len(items) - _MAX_LISTED})" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def check_layout(
    sd: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], layout: str, origin: str, url: str | None = None
) -> None:
    """Strict: every expected key present with its shape, nothing unexpected (BN counters optional)."""
    if layout in _BOQ_PREFIX:
        present = {k: v for k, v in sd.items() if k.startswith("backbone.")}
        strays = [k for k in sd if not k.startswith(("backbone.", "aggregator."))]
    else:
        present, strays = dict(sd), []
    missing = [k for k in expected if k not in present and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in present if k not in expected] + strays
    misshaped = [
        f"{k}: expected {_shape(expected[k])}, got {_shape(tuple(v.shape))}"
        for k, v in present.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
    if misshaped:
        parts.append(f"{len(misshaped)} with the wrong shape ({_listed(misshaped)})")
    seen = detect_layout(sd)
    hint = f"; it looks like a {seen!r} checkpoint" if seen and seen != layout else ""
    official = f" ({url})" if url else ""
    raise WeightsError(
        f"weights from {origin} do not match the official {layout!r} layout: {'; '.join(parts)}{hint}; "
        f"fix: pass this preset's official checkpoint{official} or one saved in its key layout, or --weights random"
    )


def load_official_(
    model, sd: Mapping[str, Any], spec: Backbone, layout: str, origin: str, url: str | None = None
) -> None:
    """Check `sd` against the full official layout, then load what `model` holds (blocks 0..L)."""
    check_layout(sd, official_layout(spec, layout), layout, origin, url)
    internal = from_official(sd, layout)
    own = model.state_dict()
    absent = [k for k in own if k not in internal and not k.endswith("num_batches_tracked")]
    if absent:  # the model holds something the official layout lacks: a build/layout mismatch
        raise WeightsError(f"weights from {origin} lack {_listed(absent)} for a {layout!r} {spec.arch} model")
    # assign: the model takes the (memory-mapped) checkpoint tensors instead of copying them
    tensors = {k: internal[k].to(own[k].dtype) for k in own if k in internal}
    model.load_state_dict(tensors, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def hub_checkpoint_path(w: Weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / w.file


SYNTHETIC = ("random", "random-outliers")  # seeded weights made here, no file (`models.outliers` for the second)


def checkpoint_file(weights: str, spec: Weights | None) -> Path | None:
    """The file a weights argument names: None for seeded random weights, the hub-cache file for 'auto', else PATH."""
    if weights in SYNTHETIC:
        return None
    if weights == "auto":
        if spec is None:
            raise WeightsError("this model has no official checkpoint for --weights auto; use --weights random or a PATH")
        return hub_checkpoint_path(spec)
    return Path(weights).expanduser()


def weights_id(weights: str, spec: Weights | None, seed: int = 0) -> str:
    """What identifies the weights a model was built with (`vpr_edge.space`): `random:seed=N`, or the
    sha256 of the checkpoint file ('auto': the official file in the hub cache, fetched first)."""
    from vpr_edge.integrity import file_sha256
    from vpr_edge.space import file_weights_id, random_weights_id

    path = checkpoint_file(weights, spec)
    if path is None:
        return random_weights_id(seed, weights)
    if weights == "auto" and not path.is_file():
        fetch_state_dict("auto", spec)  # downloads it (or says where to put it)
    _check_is_file(path)
    return file_weights_id(file_sha256(path))


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise WeightsError(f"--weights {path} is a folder; pass the checkpoint file inside it (a .pth state dict)")
    if not path.is_file():
        raise WeightsError(
            f"checkpoint {path} not found; pass an existing .pth state dict, 'auto' for the official one, or 'random'"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


_REFUSED = ("Unsupported global", "Unsupported class", "unrecognized function", "Can only build Tensor")


def _load_mapped(path: Path):
    """Memory-map zip-format checkpoints: weights are read from the page cache as they are used and
    `load_official_` hands them to the model without a copy (ViT-G: the whole 4.2 GiB file in RAM
    next to the model's own 3.3 GiB otherwise). Legacy-format files cannot be mapped: read them."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def torch_load_refusal(path: Path, exc: BaseException, expected: str = "a PyTorch state dict") -> str:
    """One line of ours for a file torch.load(weights_only=True) would not read: never torch's advice to
    turn weights_only off (a file that needs it can run code)."""
    msg = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and any(s in msg for s in _REFUSED):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        detail = f"it needs {found.group(1)}" if found else "it holds Python objects"
        return (
            f"{path} pickles Python objects beyond tensors ({detail}) and was refused unread: loading it could run "
            f"code; expected {expected}. If you trust its source, re-save only the tensors there "
            f"(torch.save(model.state_dict(), path)); otherwise delete it"
        )
    why = _first_line(exc)[:120]
    if "weights_only" in msg or isinstance(exc, pickle.UnpicklingError):
        why = "not tensor data torch.load(weights_only=True) can read"  # never torch's advice to turn that off
    return (
        f"{path} is not a readable PyTorch file ({type(exc).__name__}: {why}); the file is truncated, corrupt or "
        f"of another kind: expected {expected}; replace it with a good copy"
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) of a plain state dict, with one-line errors."""
    path = Path(path).expanduser()
    _check_is_file(path)
    try:
        obj = _load_mapped(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError, AttributeError,
            TypeError, IndexError) as exc:
        raise WeightsError(torch_load_refusal(path, exc)) from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [str(k) for k in bad if isinstance(obj[k], Mapping)]
        if nested:
            raise WeightsError(
                f"{path} is a wrapper dict (keys {_listed([str(k) for k in obj])}), not a plain state dict as the "
                f"official files are; fix: torch.save(torch.load(path)[{nested[0]!r}], new_path) and pass new_path"
            )
        raise WeightsError(f"{path}: entries {_listed([str(k) for k in bad])} are not tensors; expected a state dict")
    return dict(obj)


def fetch_state_dict(weights: str, spec: Weights | None) -> dict[str, Any] | None:
    """Seeded random weights -> None; 'auto' -> the official file (torch hub cache, else downloaded); PATH -> that file."""
    if weights in SYNTHETIC:
        return None
    if weights != "auto":
        return read_checkpoint(weights)
    if spec is None:
        raise WeightsError("this model has no official checkpoint for --weights auto; use --weights random or a PATH")
    cached = hub_checkpoint_path(spec)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(cached), progress=True)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise WeightsError(
                f"could not download {spec.url} ({type(exc).__name__}: {_first_line(exc)}); fix: fetch it where there "
                f"is network and put it at {cached} (file name {spec.file}), or pass --weights PATH"
            ) from None
    return read_checkpoint(cached)


def save_official(model_or_sd, path: str | Path, layout: str) -> Path:
    """Write a model's (e.g. random) weights in the official key layout; inverse of loading."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    official = {k: v.detach().cpu().clone() for k, v in to_official(sd, layout).items()}
    path = Path(path)
    with atomic_file(path) as fh:
        torch.save(official, fh)
    return path


# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------


def init_random_(module, seed: int = 0, init_values: float = 1.0):
    """Deterministic random weights; each tensor seeded by (seed, its name), so a model cut to
    blocks 0..L gets the same values as the full one.

    Chosen so tests are meaningful: unit-gain linear/conv layers, non-zero biases (a facet that
    forgot qkv's bias would differ), LayerNorm affine away from identity, and LayerScale gamma
    near `init_values` (1.0), not dinov2's 1e-5, so every block moves the features.
    """
    for mod_name, mod in module.named_modules():
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if t is None or t.is_meta or not t.is_floating_point():
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(full.encode())) % 2**63)
            n = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name == "gamma":
                v = init_values * (1 + 0.1 * n)
            elif isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d)) and name == "weight":
                v = 1 + 0.1 * n
            elif name == "running_mean":
                v = 0.1 * n
            elif name == "running_var":
                v = torch.exp(0.2 * n)
            elif name in ("pos_embed", "cls_token", "register_tokens"):
                v = 0.2 * n
            elif name == "mask_token":
                v = 0.02 * n
            elif t.ndim >= 2:
                v = n / math.sqrt(max(1, t[0].numel()))  # fan_in of Linear [out, in] / Conv [out, in, k, k]
            else:
                v = 0.05 * n
            with torch.no_grad():
                t.copy_(v)
    for sub in module.modules():  # cached position tables follow the new pos_embed
        if hasattr(sub, "_refresh_fixed_pos_embed"):
            sub._refresh_fixed_pos_embed()
    return module


# ---------------------------------------------------------------------------------------------
# Convenience
# ---------------------------------------------------------------------------------------------


def load_backbone(
    spec: Backbone,
    weights: str = "random",
    num_blocks: int | None = None,
    seed: int = 0,
    *,
    source: Weights | None = None,
    layout: str | None = None,
    state_dict: Mapping[str, Any] | None = None,
    image_size: tuple[int, int] | None = None,
):
    """Build a backbone and give it weights: 'random' (seeded), 'random-outliers' (seeded, with massive
    activations planted: `models.outliers`), 'auto' or a PATH, or `state_dict`.

    `source` is where the official file lives (default spec.weights; for BoQ it is the preset's
    weights). The module built follows the layout: VisionTransformer for dinov2/dino (blocks
    0..num_blocks-1 only), BoQDinoV2 / BoQResNet for BoQ layouts. Returned in eval mode.
    """
    source = source if source is not None else spec.weights
    layout = layout or (source.layout if source is not None else default_layout(spec))
    model = build_for_layout(spec, layout, num_blocks)
    if state_dict is None:
        state_dict = fetch_state_dict(weights, source)
        origin = f"{hub_checkpoint_path(source)} ({source.url})" if weights == "auto" and source else str(weights)
    else:
        origin = "the given state dict"
    if state_dict is None:
        init_random_(model, seed)
        if weights == "random-outliers":
            from vpr_edge.models.outliers import plant_outliers_

            if image_size is None:
                raise ConfigError("--weights random-outliers needs the input size (massive tokens are placed on its grid)")
            plant_outliers_(model, image_size, seed)
    else:
        load_official_(model, state_dict, spec, layout, origin, source.url if source is not None else None)
    model.eval()
    if image_size is not None:
        model.set_image_size(image_size)
    return model


def load_boq_backbone(
    spec: Backbone,
    weights: str = "random",
    seed: int = 0,
    *,
    source: Weights | None = None,
    state_dict: Mapping[str, Any] | None = None,
    image_size: tuple[int, int] | None = None,
):
    """BoQ's backbone (BoQResNet / BoQDinoV2), whatever the spec's own weights say."""
    layout = "boq-resnet50" if spec.family == "resnet" else "boq-dinov2"
    if source is not None and source.layout != layout:
        raise ConfigError(f"BoQ backbone for {spec.arch} expects a {layout!r} checkpoint, preset names {source.layout!r}")
    return load_backbone(
        spec, weights, None, seed, source=source, layout=layout, state_dict=state_dict, image_size=image_size
    )


def subdict(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Entries under `prefix` with it stripped (e.g. a BoQ file's 'aggregator.' part)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
