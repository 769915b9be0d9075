"""Locate checkpoint files: a file, a sharded index, or a directory of either.

Nothing here ever unpickles: pickle-based formats are refused by their suffix before the
file is opened. Headers are validated by :mod:`surgery.weights.header`, tensor data is
read by :mod:`surgery.weights.reading` (both re-exported here), and only regular files
are ever opened (:mod:`surgery.weights.paths`).
"""
from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from surgery.errors import WeightsError
from surgery.weights.header import FLOAT_CODES, TensorEntry, invalid_file, read_header, torch_dtype
from surgery.weights.paths import confined_shard, open_regular, require_regular_file, stat_path
from surgery.weights.reading import TensorFile, fresh_cpu, open_tensors, read_tensor

__all__ = [
    "FLOAT_CODES",
    "PICKLE_SUFFIXES",
    "TensorEntry",
    "TensorFile",
    "fresh_cpu",
    "invalid_file",
    "open_tensors",
    "pickle_refusal",
    "read_header",
    "read_tensor",
    "require_regular_file",
    "resolve_checkpoint",
    "torch_dtype",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d+)-of-(?P<total>\d+)\.safetensors$")


def pickle_refusal(path: Path) -> WeightsError:
    """The error for a pickle-based checkpoint; the file is never opened."""
    safe = path.with_suffix(".safetensors").name
    return WeightsError(
        f"{path} is a pickle-based checkpoint ({path.suffix}); pickles can run arbitrary code and are never loaded",
        "convert it once in a trusted environment: python -c \"import torch, safetensors.torch as s; "
        f"s.save_file(torch.load('{path.name}', weights_only=True), '{safe}')\"",
    )


def _index_files(index: Path) -> dict[str, Path]:
    """Parse a ``*.safetensors.index.json``: stored tensor name -> shard path (confined to its directory)."""
    fd, _ = open_regular(index, "weights index")
    try:
        with open(fd, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"{index} is not a valid safetensors index ({exc})",
            "the index must be JSON with a 'weight_map' object {tensor name: shard file}",
        ) from exc
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        shard = confined_shard(index, file)
        if shard.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(shard)
        shards[name] = shard
    missing = sorted({str(p) for p in shards.values() if not p.exists() and not p.is_symlink()})
    if missing:
        raise WeightsError(
            f"{index} names shard files that do not exist: {', '.join(missing)}",
            "download every shard listed in the index next to it",
        )
    for shard in sorted(set(shards.values())):
        require_regular_file(shard, "weights shard")
    return shards


def _directory_checkpoint(directory: Path) -> Path | list[Path]:
    """Pick the checkpoint inside a directory: an index, one file, or a complete shard set."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise WeightsError(
            f"{directory} holds several safetensors indexes: {', '.join(p.name for p in indexes)}",
            "pass the index file you mean instead of the directory",
        )
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refusal(pickles[0])
        raise WeightsError(f"{directory} contains no .safetensors file", "pass the checkpoint file itself")
    shard = [_SHARD_RE.match(p.name) for p in files]
    if all(shard):
        groups = {(m["stem"], m["total"]) for m in shard if m}
        if len(groups) == 1:
            stem, total = groups.pop()
            want = {f"{stem}-{i:0{len(total)}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)}
            have = {p.name for p in files}
            if want == have:
                return files
            raise WeightsError(
                f"{directory} has an incomplete shard set: missing {', '.join(sorted(want - have))}",
                "download the missing shards",
            )
    raise WeightsError(
        f"{directory} holds several unrelated .safetensors files: {', '.join(p.name for p in files)}",
        "pass the checkpoint file (or its .safetensors.index.json) instead of the directory",
    )


def resolve_checkpoint(path: str | Path) -> dict[str, TensorEntry]:
    """Turn a checkpoint path into validated header entries keyed by stored tensor name.

    ``path`` may be a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory
    holding one index, one file, or one complete ``-0000i-of-0000n`` shard set. Pickle
    formats are refused by suffix before anything is opened.
    """
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    is_dir = stat.S_ISDIR(stat_path(path, "weights file").st_mode)
    if not is_dir:
        require_regular_file(path, "weights file")
    target: Path | list[Path] = _directory_checkpoint(path) if is_dir else path
    if isinstance(target, list):
        return _merge({p: read_header(p) for p in target})
    if target.name.endswith(".index.json"):
        shards = _index_files(target)
        headers = {p: read_header(p) for p in sorted(set(shards.values()))}
        entries = _merge(headers)
        wrong = sorted(n for n, p in shards.items() if n not in entries or entries[n].file != p)
        if wrong:
            raise WeightsError(
                f"{target} maps {len(wrong)} tensors to shards that do not hold them (e.g. {wrong[0]!r})",
                "the index does not belong to these shards; re-download the index",
            )
        return entries
    if target.suffix != ".safetensors":
        raise WeightsError(
            f"{target} has an unknown weights format ({target.suffix or 'no suffix'})",
            "only .safetensors files, *.safetensors.index.json indexes or directories of them are accepted",
        )
    return read_header(target)


def _merge(headers: Mapping[Path, dict[str, TensorEntry]]) -> dict[str, TensorEntry]:
    merged: dict[str, TensorEntry] = {}
    for entries in headers.values():
        for name, entry in entries.items():
            if name in merged:
                raise WeightsError(
                    f"tensor {name!r} appears in both {merged[name].file} and {entry.file}",
                    "the shards overlap; pass a single consistent checkpoint",
                )
            merged[name] = entry
    return merged
