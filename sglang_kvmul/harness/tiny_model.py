"""Builds small Llama and Qwen3 models offline: a byte-level BPE tokenizer trained on the stdlib's sources
plus a config; no weights (SGLang's `--load-format dummy` fills random ones, seeded alike on
every rank). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB = 2048


@dataclass(frozen=True)
class ModelShape:
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    arch: str = "llama"  # "qwen3": attention shards heads by the attention-TP size (attention DP works)


SHAPES = {
    # functional tests: fast on one core
    "tiny": ModelShape(),
    # benchmarks: wide and shallow so a prefix hit saves most of the work on CPU (torch_native
    # attention recomputes attention over the whole sequence, linear layers dominate here)
    "bench": ModelShape(layers=2, hidden=1024, heads=16, kv_heads=16, intermediate=4096),
    # attention DP: the tiny shape as Qwen3 (Llama shards attention by the full TP size)
    "tiny-qwen3": ModelShape(arch="qwen3"),
}
_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGLANG_KVMUL_CACHE", Path.home() / ".cache" / "sglang-kvmul"))


def _train_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:200]

    def lines():
        for f in files:
            with open(f, encoding="utf-8", errors="ignore") as fh:
                yield from fh

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=65536
    )
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    hf.save_pretrained(out)
    return {"bos_token_id": bos, "eos_token_id": tok.token_to_id("</s>"), "pad_token_id": tok.token_to_id("<pad>")}


def build(name: str = "tiny", cache_dir: Path | None = None) -> Path:
    """Path of the named model, built on first use (about 2 s)."""
    shape = SHAPES[name]
    out = (cache_dir or default_cache_dir()) / (name if shape.arch != "llama" else f"llama-{name}")
    stamp = out / "shape.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(shape):
        return out
    out.mkdir(parents=True, exist_ok=True)
    special = _train_tokenizer(out)
    cfg = {
        "architectures": [_ARCH[shape.arch][0]],
        "model_type": _ARCH[shape.arch][1],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        **({"use_sliding_window": False, "max_window_layers": shape.layers} if shape.arch == "qwen3" else {}),
        **special,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(special))
    stamp.write_text(json.dumps(asdict(shape)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", nargs="?", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--cache-dir", type=Path, default=None)
    print(build(ap.parse_args().name, ap.parse_args().cache_dir))


if __name__ == "__main__":
    main()
