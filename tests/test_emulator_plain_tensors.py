"""Emulated npu tensors are plain ``torch.Tensor`` objects, as torch_npu's are (issue 17, cause 6).

Code that compares ``type()`` of results (sentence-transformers' own multi-process tests do) must see no difference
between the emulator and torch_npu. Each test here looks at one way a tensor reaches a caller: made on the npu,
moved there, returned by an operator (new memory, a view, in place, out=), loaded by torch.load, and returned by
sentence-transformers from an npu model and from a multi-process pool.
"""

from __future__ import annotations

import copy
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

from st_npu import patching

pytestmark = needs_emulator
TEXTS = [f"sentence {i}: " + "word " * (i % 5) for i in range(12)]


def plain(tensor: object, device: str) -> bool:
    return type(tensor) is torch.Tensor and tensor.device == torch.device(device)


def test_made_on_and_moved_to_the_npu():
    assert plain(torch.ones(2, device="npu:1"), "npu:1")
    assert plain(torch.tensor([1, 2], device="npu:2"), "npu:2")
    assert plain(torch.randn(3).to("npu:3"), "npu:3")
    assert plain(torch.randn(3).to("npu:3").to("npu:4"), "npu:4")
    assert plain(torch.ones(2, device="npu:3").new_tensor([5]), "npu:3")
    assert type(torch.ones(2, device="npu:1").cpu()) is torch.Tensor


def test_returned_by_operators():
    x = torch.arange(12.0).reshape(3, 4).to("npu:2")
    results = {"new memory": x * 2, "reduction": x.sum(), "view": x[1:].t(), "in place": x.add_(1),
               "out=": torch.mul(x, 3, out=torch.empty(0, device="npu:2")), "several": torch.max(x, dim=1).values}
    for name, result in results.items():
        assert plain(result, "npu:2"), name
    assert results["in place"] is x
    # A view shares its base's npu storage; in-place writes through it show in the base.
    results["view"].zero_()
    assert x.untyped_storage().data_ptr() == results["view"].untyped_storage().data_ptr()
    assert torch.equal(x.cpu()[1:], torch.zeros(2, 4)) and x.untyped_storage().device == torch.device("npu:2")


def test_parameters_stay_parameters():
    layer = torch.nn.Linear(4, 2).to("npu:1")
    assert type(layer.weight) is torch.nn.Parameter and layer.weight.device == torch.device("npu:1")
    assert plain(layer(torch.ones(1, 4, device="npu:1")).detach(), "npu:1")


def test_torch_load_puts_a_plain_tensor_back_on_its_npu():
    buffer = io.BytesIO()
    torch.save(torch.arange(4.0).to("npu:5"), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert plain(loaded, "npu:5") and torch.equal(loaded.cpu(), torch.arange(4.0))


def test_encode_to_tensor_on_an_npu_model(tiny_cls):
    expected = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu").encode(
        TEXTS, convert_to_tensor=True)
    with patching.patch():
        model = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:3")
        embeddings = model.encode(TEXTS, convert_to_tensor=True)
        single = model.encode(TEXTS[0], convert_to_tensor=True)
    assert plain(embeddings, "npu:3") and plain(single, "npu:3")
    assert torch.allclose(embeddings.cpu(), expected, atol=1e-6)


def test_a_pool_returns_the_type_a_single_process_returns(tiny_cls, monkeypatch):
    monkeypatch.delenv("ST_NPU_EMULATE", raising=False)  # workers get the parent's emulator all the same
    with patching.patch():
        model = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:0")
        alone = model.encode(TEXTS, convert_to_tensor=True)
        pool = model.start_multi_process_pool(["npu:0", "npu:1"])
        try:
            pooled = model.encode(TEXTS, pool=pool, chunk_size=3, convert_to_tensor=True)
        finally:
            model.stop_multi_process_pool(pool)
    patching.unpatch()
    assert type(pooled) is type(alone) is torch.Tensor
    assert torch.allclose(pooled.cpu(), alone.cpu(), atol=1e-6)


def test_numpy_refuses_an_npu_tensor_as_torch_does():
    with pytest.raises(TypeError, match="can't convert npu:1 device type tensor to numpy"):
        torch.ones(2, device="npu:1").numpy()


def test_copies_storages_and_processes_keep_the_npu():
    """Paths where torch allocates an npu storage itself or shares a tensor with another process."""
    layer = copy.deepcopy(torch.nn.Linear(3, 2).to("npu:4"))
    assert type(layer.weight) is torch.nn.Parameter and layer.weight.device == torch.device("npu:4")
    assert torch.UntypedStorage(8, device="npu:4").device == torch.device("npu:4")
    x = torch.arange(3.0).to("npu:4")
    shared = pickle.loads(ForkingPickler.dumps(x))  # what a torch.multiprocessing queue does
    assert plain(shared, "npu:4") and torch.equal(shared.cpu(), torch.arange(3.0))


def test_made_in_inference_mode_is_an_inference_tensor_as_on_a_device():
    with torch.inference_mode():
        x = torch.ones(2, device="npu:1")
        y = torch.ones(2).to("npu:1") + 1
    assert x.is_inference() and y.is_inference()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        x.add_(1)
