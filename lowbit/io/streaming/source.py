"""Reading a Hugging Face checkpoint folder for streaming: its shards, its config, a model with no memory."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from torch import nn


def streams(src: str | Path) -> bool:
    """src is a Hugging Face checkpoint folder of safetensors (what quantize_checkpoint reads)."""
    src = Path(src)
    return src.is_dir() and (src / "config.json").is_file() and (
        (src / "model.safetensors.index.json").is_file() or (src / "model.safetensors").is_file())


class SourceTensors(dict):
    """{the model's tensor name: the shard holding it}; `stored` names a tensor the file names
    otherwise (a mixture-of-experts checkpoint's per-expert names, when lowbit's experts are
    named for another convention)."""

    def __init__(self, where: dict, stored: dict | None = None):
        super().__init__(where)
        self.stored = stored or {}

    def stored_name(self, key: str) -> str:
        return self.stored.get(key, key)


def expert_renames(model_type: str) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) taking a checkpoint's per-expert tensor names to nn.RoutedExperts'
    (`experts.{e}.gate_proj/up_proj/down_proj`), read from transformers' own conversion table for
    the model type (which fuses them into its 3-D experts): Mixtral's `block_sparse_moe.experts.{e}.w1`
    is `mlp.experts.{e}.gate_proj`."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x: experts are Linear layers under the checkpoint's names
        return []
    out = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        if type(rule).__name__ == "WeightRenaming":
            out += [(re.compile(re.escape(a)), b) for a, b in zip(sources, targets)]
            continue
        if len(targets) != 1:
            continue
        into = {"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)}
        names = next((v for k, v in into.items() if targets[0].endswith(k)), None)
        if names is None or len(names) != len(sources):
            continue
        for pattern, name in zip(sources, names):  # ".experts.*.w1.weight" -> ".experts.{e}.gate_proj.weight"
            before, _, after = pattern.partition("*")
            out.append((re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + "$"),
                        before.replace("\\", "\\\\") + r"\1." + name + ".weight"))
    return out


def source_tensors(src: Path) -> SourceTensors:
    """tensor name -> the shard holding it, checked: the index's shards exist and hold what it says."""
    from safetensors import safe_open

    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a Hugging Face checkpoint folder: config.json is missing")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            where = {str(k): src / str(v) for k, v in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is corrupt: {e}") from e
    elif (src / "model.safetensors").is_file():
        where = None
    else:
        raise ValueError(f"{src} has neither model.safetensors nor model.safetensors.index.json")
    found = {}
    for shard in sorted({*where.values()} if where else {src / "model.safetensors"}):
        if not shard.is_file():
            raise ValueError(f"{index}: shard {shard.name} is missing from {src}")
        try:
            with safe_open(str(shard), framework="pt") as f:
                found.update({k: shard for k in f.keys()})
        except Exception as e:  # safetensors raises its own error kinds for truncated or foreign files
            raise ValueError(f"{shard} is unreadable or truncated: {e}") from e
    if where:
        wrong = sorted(k for k, s in where.items() if found.get(k) != s)
        if wrong:
            raise ValueError(f"{index} does not match its shards: tensor {wrong[0]!r} is not in "
                             f"{where[wrong[0]].name} ({len(wrong)} such tensors)")
    return SourceTensors(found)


def renamed(where: SourceTensors, rules: list[tuple[re.Pattern, str]]) -> SourceTensors:
    """`where` under the model's names (expert_renames), remembering what each is called on disk."""
    out, stored = {}, {}
    for key, shard in where.items():
        name = key
        for pattern, replacement in rules:
            name = pattern.sub(replacement, name)
        out[name] = shard
        if name != key:
            stored[name] = key
    return SourceTensors(out, stored)


def skeleton(src: Path) -> nn.Module:
    """The model of src's config with its parameters on the meta device: module names and shapes,
    no memory. Buffers computed from the config (rotary frequencies) are real, so that a block
    loaded from disk runs (calibrated methods run the model a block at a time)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # transformers raises several kinds for a bad config
        raise ValueError(f"{src / 'config.json'} is not a config transformers reads: {e}") from e
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered meanwhile moves to the meta device (what accelerate's
    init_empty_weights(include_buffers=False) does): modules allocate theirs uninitialised on
    the CPU, which costs no resident memory, and drop them at once."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
