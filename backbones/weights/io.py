"""Reading and writing model checkpoints safely.

- :func:`load_state_dict_file` reads ``.safetensors`` files, HDF5 files (one dataset per key, as
  the official ACNet code writes them; needs h5py, the ``hdf5`` extra) or torch files, the latter
  always with ``weights_only=True`` (no arbitrary code runs while unpickling), and unwraps the
  usual containers (a bare state dict, Lightning's ``{"state_dict": ...}``, ``{"model": ...}``).
- :func:`strip_prefix` removes the DDP ``module.`` prefix and, on request, a task prefix
  (``backbone.``, ``model.``) shared by every key.
- :func:`load_into` loads strictly and, on failure, explains what differs: the file, the arch,
  missing/unexpected keys, shape mismatches, and a train-time/deploy mode mismatch.
- :func:`save_checkpoint` / :func:`save_deploy_checkpoint` write atomically, with the arch, its
  constructor arguments and the mode recorded next to the weights.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "BACKBONE_PREFIX",
    "TASK_PREFIXES",
    "load_state_dict_file",
    "is_safetensors_file",
    "is_hdf5_file",
    "HDF5_INSTALL_HINT",
    "read_torch_file",
    "atomic_write",
    "atomic_write_json",
    "strip_prefix",
    "select_prefix",
    "state_dict_mode",
    "model_mode",
    "check_fits",
    "load_into",
    "listing",
    "save_checkpoint",
    "save_deploy_checkpoint",
]

PathLike = str | os.PathLike
Mode = Literal["train", "deploy", "unknown"]

# Where training frameworks nest a backbone's weights (a LightningModule's attribute name);
# this project's tasks keep theirs under BACKBONE_PREFIX.
BACKBONE_PREFIX = "backbone."
TASK_PREFIXES = (BACKBONE_PREFIX, "model.")
# Top-level keys that hold the state dict in common checkpoint containers, in order of preference.
_CONTAINER_KEYS = ("state_dict", "model")
_MAX_LISTED = 5

HDF5_INSTALL_HINT = 'pip install -e ".[hdf5]"'
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")
# Entries of an HDF5 weight file that describe the network rather than hold its tensors: the
# official ACNet engine (utils/engine.py: save_hdf5) adds its config's layer widths as ``deps``.
_HDF5_META_KEYS = frozenset({"deps"})


# --------------------------------------------------------------------------- reading
def is_safetensors_file(path: str) -> bool:
    """True if ``path`` has the safetensors layout: an 8-byte header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len < os.path.getsize(path)


def is_hdf5_file(path: str) -> bool:
    """True if ``path`` starts with the HDF5 signature (``\\x89HDF\\r\\n\\x1a\\n``)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False


def _hdf5_meta_value(value: Any) -> Any:
    """A non-tensor HDF5 entry as a plain value: arrays as (nested) lists, bytes as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_hdf5_meta_value(v) for v in value]
    return value


def _read_hdf5(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An HDF5 weight file as ``(state_dict, meta)``: each numeric dataset is a tensor under its
    name (``+`` read back as ``/``, as the official ACNet ``read_hdf5`` does), ``deps`` and
    non-numeric datasets go to ``meta`` as lists. Reading runs no code from the file."""
    import numpy as np

    try:
        import h5py
    except ImportError as exc:
        raise ImportError(f"{path} is an HDF5 file; reading it needs h5py (the hdf5 extra): "
                          f"{HDF5_INSTALL_HINT}") from exc
    arrays: dict[str, Any] = {}
    groups: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            for name, item in f.items():
                if isinstance(item, h5py.Dataset):
                    arrays[name.replace("+", "/")] = np.asarray(item[()])
                else:
                    groups.append(name)
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError... for damaged files
        summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a readable checkpoint: {path} (HDF5: {summary}); the file is truncated, corrupt "
                         "or not an HDF5 file") from exc
    if groups:
        raise ValueError(f"not a readable checkpoint: {path} holds HDF5 groups ({listing(groups)}); weight files "
                         "are read in the flat layout the official ACNet code writes (one dataset per key)")
    state_dict: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for name, array in arrays.items():
        if name in _HDF5_META_KEYS or array.dtype.kind not in "biufc":
            meta[name] = _hdf5_meta_value(array.tolist())
        else:  # torch takes native byte order only; a 0-d dataset (a BN's counter) stays 0-d
            state_dict[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
    if not state_dict:
        raise ValueError(f"not a readable checkpoint: {path} contains no tensors "
                         f"(HDF5 datasets: {listing(list(arrays)) or 'none'})")
    return state_dict, meta


def _json_like(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_like(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    return False


def _decode_safetensors_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = dict(metadata)
    if "model_kwargs" in meta:
        try:
            meta["model_kwargs"] = json.loads(meta["model_kwargs"])
        except (TypeError, json.JSONDecodeError):
            pass  # leave a non-JSON value as the string it is
    if isinstance(meta.get("deploy"), str) and meta["deploy"].lower() in ("true", "false"):
        meta["deploy"] = meta["deploy"].lower() == "true"
    return meta


def _read_safetensors(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path, device="cpu")
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, OSError, ...)
        raise ValueError(f"not a readable checkpoint: {path} (safetensors: {exc})") from exc
    return state_dict, _decode_safetensors_metadata(metadata)


# Classes the official training scripts pickle beside the weights that weights_only may rebuild: an
# argparse.Namespace holds only attributes (RepLKNet's and DeiT-style ``utils.save_model`` store ``args``).
SAFE_GLOBALS = [argparse.Namespace]


def read_torch_file(path: str, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` whose failures say what is wrong with the file: truncated or corrupt, or
    holding objects that ``weights_only=True`` refuses (named). Raises ``ValueError``.
    ``mmap``: map the tensors instead of reading them (for a look at the other entries)."""
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format, not the legacy one
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as exc:  # truncated zip, bad pickle, refused global, ...
        text = str(exc).strip()
        if "Weights only load failed" in text:
            first = next((line for line in text.splitlines() if "Unsupported" in line or "global" in line), "")
            raise ValueError(
                f"not a readable checkpoint: {path} holds Python objects other than tensors and plain "
                f"containers, and is only read with weights_only=True for safety"
                f"{' (' + first.strip() + ')' if first else ''}; re-save just the state dict "
                "(torch.save(model.state_dict(), path)) or use a .safetensors file"
            ) from exc
        summary = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(
            f"not a readable checkpoint: {path} ({type(exc).__name__}: {summary}); "
            "the file is truncated, corrupt or not a torch/safetensors checkpoint"
        ) from exc


def _unwrap(obj: Any, path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"not a readable checkpoint: {path} holds a {type(obj).__name__}, not a dict of tensors")
    container = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if container is not None:
        raw = obj[container]
        others = {k: v for k, v in obj.items() if k != container}
        bad = [k for k, v in raw.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(
                f"not a readable checkpoint: {path}: entries of {container!r} are not tensors: "
                f"{listing(bad)}"
            )
        state_dict = dict(raw)
    else:
        state_dict = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        others = {k: v for k, v in obj.items() if not isinstance(v, Tensor)}
    meta = {k: v for k, v in others.items() if isinstance(k, str) and _json_like(v)}
    if not state_dict:
        raise ValueError(
            f"not a readable checkpoint: {path} contains no tensors "
            f"(top-level keys: {listing(list(map(str, obj.keys())))})"
        )
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"not a readable checkpoint: {path}: state dict keys must be strings, got {bad_keys[:3]}")
    return state_dict, meta


def load_state_dict_file(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file and return ``(state_dict, meta)``.

    ``.safetensors`` files (recognized by extension or content) are read with safetensors; their
    string metadata becomes ``meta`` (``model_kwargs`` JSON-decoded, ``deploy`` as a bool).
    HDF5 files (``.hdf5``/``.h5``/``.hdf`` or the HDF5 signature) are read with h5py: one tensor
    per dataset, ``deps`` and other non-numeric entries in ``meta``. Other files are read with
    ``torch.load(..., map_location="cpu", weights_only=True)`` and may hold a bare state dict or
    one nested under ``"state_dict"`` (Lightning) or ``"model"``; the other top-level entries
    with plain values (``arch``, ``model_kwargs``, ``deploy``, ``epoch``...) become ``meta``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable (truncated, corrupt, refused by ``weights_only``) or
            holds no state dict; the message names the path.
        ImportError: an HDF5 file without h5py installed (the message names the file and
            :data:`HDF5_INSTALL_HINT`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path is a directory, not a file: {path}")
    if path.endswith(".safetensors") or is_safetensors_file(path):
        state_dict, meta = _read_safetensors(path)
        if not state_dict:
            raise ValueError(f"not a readable checkpoint: {path} contains no tensors")
        return state_dict, meta
    if path.lower().endswith(_HDF5_SUFFIXES) or is_hdf5_file(path):
        return _read_hdf5(path)
    return _unwrap(read_torch_file(path), path)


# --------------------------------------------------------------------------- key prefixes
def _strip_common(state_dict: dict[str, Tensor], prefix: str) -> Optional[dict[str, Tensor]]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return None


def strip_prefix(
    state_dict: Mapping[str, Tensor],
    prefixes: Iterable[str] = ("module.",),
    auto: bool = False,
    task_prefixes: Iterable[str] = TASK_PREFIXES,
) -> dict[str, Tensor]:
    """Remove key prefixes that every key shares.

    Each of ``prefixes`` (default: DDP's ``module.``) is removed when *all* keys start with it;
    with ``auto=True`` one of ``task_prefixes`` (``backbone.``, ``model.``) is removed the same
    way. Repeats until nothing changes, so ``model.module.backbone.`` unwraps fully. A prefix
    that only some keys have is left alone (stripping it would mix sub-modules); use
    :func:`select_prefix` to keep one sub-module of a larger checkpoint.
    """
    result = dict(state_dict)
    candidates = list(prefixes) + (list(task_prefixes) if auto else [])
    changed = True
    while changed:
        changed = False
        for prefix in candidates:
            stripped = _strip_common(result, prefix)
            if stripped is not None:
                result, changed = stripped, True
    return result


def select_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` with the prefix removed (e.g. ``backbone.`` of a task checkpoint)."""
    if not prefix.endswith("."):
        prefix += "."
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        firsts = sorted({k.split(".", 1)[0] + "." for k in state_dict})
        raise ValueError(f"no key starts with {prefix!r}; top-level prefixes are {listing(firsts)}")
    return selected


# --------------------------------------------------------------------------- modes
def _is_bn_key(key: str) -> bool:
    """A BatchNorm entry: a module named ``bn`` or ``*_bn`` (``fc3_bn``, ``gp_bn``) on the key's path."""
    return any(part == "bn" or part.endswith("_bn") for part in key.split(".")[:-1])


def state_dict_mode(state_dict: Mapping[str, Any]) -> Mode:
    """``"train"`` if the state dict has BatchNorm entries, ``"deploy"`` if it has none and has
    fused biases (``conv.bias``, ``fc3.bias``), otherwise ``"unknown"`` (a model without BNs)."""
    if any(_is_bn_key(k) for k in state_dict):
        return "train"
    if any(k.endswith(("conv.bias", "fc3.bias")) for k in state_dict):
        return "deploy"
    return "unknown"


def model_mode(model: nn.Module) -> Mode:
    """The mode of a model: its ``deploy`` attribute if it has one, else that of its state dict."""
    deploy = getattr(model, "deploy", None)
    if isinstance(deploy, bool):
        return "deploy" if deploy else "train"
    return state_dict_mode(model.state_dict())


def listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _mode_hint(ckpt: Mode, model: Mode) -> Optional[str]:
    if ckpt == "deploy" and model == "train":
        return (
            "checkpoint is in deploy form; build the model with deploy=True "
            "(it has fused biases and no BatchNorm keys, the model is train-time)"
        )
    if ckpt == "train" and model == "deploy":
        return (
            "checkpoint is in train-time form; build the model with deploy=False "
            "(it has BatchNorm keys, the model is in deploy form), or convert the checkpoint first "
            "with python -m backbones.convert"
        )
    return None


def check_fits(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    arch: str,
    checkpoint_arch: Optional[str] = None,
    hints: Iterable[str] = (),
) -> None:
    """Raise one ValueError that says why ``state_dict`` does not load strictly into ``model``.

    The message names ``source`` (the file) and ``arch``, the first missing and unexpected keys,
    shape mismatches, and, when the checkpoint and the model differ in mode, says so explicitly
    ("checkpoint is in deploy form; build the model with deploy=True", or the reverse).
    ``checkpoint_arch``: the arch recorded in the checkpoint, if any, for the message.
    ``hints``: caller-specific explanations (e.g. a class-count mismatch), listed first.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        return

    ckpt_mode, mdl_mode = state_dict_mode(state_dict), model_mode(model)
    lines = [f"checkpoint {source} does not fit model {arch!r} (deploy={mdl_mode == 'deploy'})", *hints]
    hint = _mode_hint(ckpt_mode, mdl_mode)
    if hint:
        lines.append(hint)
    elif checkpoint_arch and checkpoint_arch != arch:
        lines.append(f"the checkpoint records arch {checkpoint_arch!r}, a different architecture than {arch!r}")
    else:
        lines.append(
            f"the checkpoint is probably of a different architecture than {arch!r}, "
            "or was saved with other model arguments (num_classes, model_kwargs)"
        )
    if missing:
        lines.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if mismatched:
        lines.append(f"{len(mismatched)} shape mismatch(es): {listing(mismatched)}")
    raise ValueError("\n  ".join(lines))


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    arch: str,
    checkpoint_arch: Optional[str] = None,
    hints: Iterable[str] = (),
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, or raise :func:`check_fits`'s error (with the
    caller's ``hints``). Returns ``model``."""
    check_fits(model, state_dict, source, arch, checkpoint_arch, hints)
    model.load_state_dict(dict(state_dict), strict=True)
    return model


# --------------------------------------------------------------------------- writing
def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    The temporary files of an earlier save of ``path`` that was killed before its rename
    (``.NAME.*.tmp``, as large as the file) are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    for stale in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(prefix)}*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, value: Any) -> None:
    """Write ``value`` as indented JSON (no NaN or infinity) with :func:`atomic_write`."""
    text = json.dumps(value, indent=2, allow_nan=False)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(path, write)


def _plain_kwargs(model_kwargs: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    kwargs.pop("deploy", None)  # recorded separately
    try:
        return json.loads(json.dumps(kwargs))  # tuples become lists, as they will read back
    except TypeError as exc:
        raise ValueError(f"model_kwargs must be JSON-serializable to be recorded: {exc}") from exc


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    arch: str,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write ``model``'s state dict with its arch, constructor arguments and mode, atomically.

    ``*.safetensors``: safetensors with string metadata ``{"arch", "model_kwargs" (JSON),
    "deploy" ("true"/"false"), "format": "pt"}``. Any other name: ``torch.save`` of
    ``{"state_dict", "arch", "model_kwargs", "deploy"}``, which loads with ``weights_only=True``.
    ``deploy`` is the model's mode (:func:`model_mode`). Rebuild with
    ``backbones.create(arch, deploy=meta["deploy"], **meta["model_kwargs"])``.
    """
    path = os.fspath(path)
    kwargs = _plain_kwargs(model_kwargs)
    deploy = model_mode(model) == "deploy"
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = {"arch": arch, "model_kwargs": json.dumps(kwargs), "deploy": str(deploy).lower(), "format": "pt"}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        payload = {"state_dict": tensors, "arch": arch, "model_kwargs": kwargs, "deploy": deploy}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_deploy_checkpoint(
    model: nn.Module,
    path: PathLike,
    arch: str,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> None:
    """:func:`save_checkpoint` for a converted model; refuses a model that is still train-time."""
    if model_mode(model) == "train":
        raise ValueError(
            f"save_deploy_checkpoint: the {arch!r} model is in train-time form; "
            "convert it first with backbones.reparameterize_model(model)"
        )
    save_checkpoint(model, path, arch, model_kwargs)
