"""Loading streams tensors: peak host memory stays well under twice the model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

# About 190 MB of float32 weights: large enough that holding a second copy would show.
CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8192, "hidden_size": 1024,
          "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False}


def _write_checkpoint(path) -> int:
    """Random weights under HF names (shapes from a meta-device transformers model), in two
    shards with an index; returns the weights' total bytes."""
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"})
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.LlamaForCausalLM(config)
                  .named_parameters()}
    names = sorted(shapes)
    weight_map, total = {}, 0
    for index, shard_names in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = {name: torch.randn(shapes[name]) for name in shard_names}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        file_name = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file(shard, str(path / file_name))
        weight_map.update({name: file_name for name in shard_names})
        del shard
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return total


def test_peak_host_memory_while_loading_is_well_under_twice_the_model(tmp_path):
    model_bytes = _write_checkpoint(tmp_path)
    probe = textwrap.dedent(f"""
        import resource, torch
        from apex_grpc.model.loader import load_model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        load_model({str(tmp_path)!r}, "auto", "cpu", torch.float32)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=300, check=True)
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    # The model itself is one copy; streaming adds one tensor at a time (the largest here is
    # 32 MB, an eighth of the model), not a second model or a mapped file.
    assert peak_growth < 1.25 * model_bytes, (peak_growth, model_bytes)
