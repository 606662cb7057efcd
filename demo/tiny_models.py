"""Small models built from configs, never downloaded: for the demo, the tests and the benchmarks.

The tokenizer is character level, so any text round-trips and the tenant tasks of the demo
(string manipulation) are one token per character.
"""

from __future__ import annotations

import string
import warnings
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}
# Per family, what its config defaults to a released model's size (head_dim 256, a 4096-token window);
# None stands for hidden // heads. GPT-2 and Gemma tie input and output embeddings like their released
# models; sliding windows are shorter than the tests' sequences, so the tests run past them.
FAMILY_CONFIG = {
    "mistral": dict(sliding_window=4),
    "phi3": dict(original_max_position_embeddings=512),
    "gpt2": dict(tie_word_embeddings=True),
    "gemma": dict(head_dim=None, tie_word_embeddings=True),
    "gemma2": dict(head_dim=None, query_pre_attn_scalar=None, sliding_window=4, tie_word_embeddings=True),
    "qwen3": dict(head_dim=None),
}
SIZES = {
    # hidden, intermediate, layers, heads, kv heads
    "tiny": (32, 64, 2, 4, 2),
    "small": (128, 344, 4, 4, 2),
    "demo": (64, 256, 4, 4, 2),
}


def char_tokenizer():
    """A tokenizers.Tokenizer with one token per character and a BOS added to every encoding.

    The split pattern ``[\\s\\S]`` (any character, newlines included) is written without inline flags so that
    JavaScript tokenizers (tokenizers.js, for the web page) read it as Rust's tokenizers do.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIALS)
    return tok


def save_char_tokenizer(out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=char_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)


def build_causal_lm(out_dir: str | Path, family: str = "llama", size: str = "tiny", seed: int = 0,
                    with_tokenizer: bool = True, initializer_range: float = 0.02, layers: int | None = None):
    """A random-weight base model folder, as `save_pretrained` writes it; returns the model.
    ``layers`` overrides the size's number of decoder layers.

    At the usual ``initializer_range`` of 0.02 the logits are nearly flat, so top-1 flips on noise;
    quality probes use a larger range to get margins like a trained model's.
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config_cls, model_cls = (getattr(transformers, n) for n in CONFIGS[family])
    hidden, inter, size_layers, heads, kv_heads = SIZES[size]
    layers = layers or size_layers
    sizes = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, max_position_embeddings=512)
    if family == "gpt2":  # no grouped-query attention; the MLP width is n_inner
        sizes = dict(n_embd=hidden, n_inner=inter, n_layer=layers, n_head=heads, n_positions=512)
    extra = {k: hidden // heads if v is None else v for k, v in FAMILY_CONFIG.get(family, {}).items()}
    config = config_cls(
        **{
            "vocab_size": len(SPECIALS) + len(CHARS),
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "initializer_range": initializer_range,
            "architectures": [model_cls.__name__],
            **sizes,
            **extra,
        }
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if with_tokenizer:
        save_char_tokenizer(out_dir)
    return model


ENCODER_CONFIGS = {"bert": "BertConfig", "roberta": "RobertaConfig", "distilbert": "DistilBertConfig"}
ENCODER_HEADS = {"feature-extraction": "Model", "sequence-classification": "ForSequenceClassification"}
ENCODER_PREFIXES = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}


def build_encoder(out_dir: str | Path, family: str = "bert", task: str = "sequence-classification", seed: int = 0,
                  labels: tuple[str, ...] = ("negative", "neutral", "positive"), initializer_range: float = 0.2):
    """A random-weight BERT-family encoder folder (hidden 32, 2 layers) with the character tokenizer.

    The default ``initializer_range`` is ten times the usual: at 0.02 a random classifier head squashes
    every logit (and every adapter's effect on it) to near zero.
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    arch = ENCODER_PREFIXES[family] + ENCODER_HEADS[task]
    hidden, inter, layers, heads, _ = SIZES["tiny"]
    config = getattr(transformers, ENCODER_CONFIGS[family])(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_dim=inter,  # DistilBERT's name for the intermediate size
        max_position_embeddings=128,
        pad_token_id=0,
        initializer_range=initializer_range,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        architectures=[arch],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    save_char_tokenizer(out_dir)
    return model


def random_peft_adapter(base_model, out_dir: str | Path, seed: int, r: int = 4, alpha: float = 8.0,
                        targets=("q_proj", "v_proj"), **lora_kwargs):
    """A PEFT LoRA adapter with random non-zero A and B (an untrained one has B = 0, a no-op).

    ``targets`` is what PEFT's ``target_modules`` takes: names, a regex string or ``"all-linear"``.
    """
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                        init_lora_weights=False, **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes inside PEFT
        peft_model = get_peft_model(copy.deepcopy(base_model), config)
        peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    return peft_model.eval()
