"""Calls whose outcome st_npu once changed (issue 17, cause 5), and encode's options, against stock."""

from __future__ import annotations

import pytest

from conformance.doors import TEXTS, logged

PRECISIONS = ["float32", "int8", "uint8", "binary", "ubinary"]


def test_path_and_modules_warns_and_loads_the_path(conform, models):
    def body(door):
        other = list(door.load(models["static"]))
        with logged(30) as warnings:
            model = door.load(models["transformer"], modules=other)
        return [type(module) for module in model], model.encode(TEXTS), len(warnings) > 0

    conform(body)


def test_modules_alone_build_the_model(conform, models):
    def body(door):
        modules = list(door.load(models["transformer"]))
        return door.cls(modules=modules, device=door.device).encode(TEXTS)

    conform(body)


def test_save_none_does_nothing(conform, models):
    conform(lambda door: door.load(models["transformer"]).save(None))


def test_file_path_raises_not_a_directory(conform, models):
    conform(lambda door: door.load(models["transformer"] / "config.json"))


def test_missing_local_folder_raises_as_stock(conform, tmp_path):
    conform(lambda door: door.load(tmp_path / "nowhere" / "deeper" / "model"))


def test_device_map_takes_priority_over_device(conform, models):
    def body(door):  # "cuda" on a machine without one: stock ignores it (6.x says so) since device_map places
        with logged(30) as warnings:
            try:
                model = door.cls(str(models["transformer"]), device="cuda", model_kwargs={"device_map": "cpu"})
                placed = str(model.device)
            except ValueError as exc:  # without accelerate, stock refuses device_map itself
                placed = "accelerate" in str(exc)
        return placed, [message.split("`")[0] for message in warnings]

    conform(body)


@pytest.mark.parametrize("kind", ["transformer", "static"])
@pytest.mark.parametrize("function", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_as_stock(conform, models, kind, function):
    def body(door):
        model = door.load(models[kind], similarity_fn_name=function)
        embeddings = model.encode(TEXTS, convert_to_tensor=True)
        return model.similarity(embeddings, embeddings).cpu(), model.similarity_pairwise(embeddings, embeddings).cpu()

    conform(body)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_as_stock(conform, models, precision):
    conform(lambda door: door.load(models["minilm"]).encode(TEXTS, precision=precision, normalize_embeddings=True))


@pytest.mark.parametrize("kind", ["transformer", "static"])
def test_truncate_dim_as_stock(conform, models, kind):
    def body(door):
        model = door.load(models[kind], truncate_dim=8)
        return (model.truncate_dim, model.encode(TEXTS), model.encode(TEXTS, truncate_dim=4, normalize_embeddings=True),
                model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                else model.get_sentence_embedding_dimension())

    conform(body)


@pytest.mark.parametrize("kind", ["transformer", "static"])
def test_save_round_trip_keeps_truncate_dim_prompts_and_similarity(conform, models, kind, tmp_path_factory):
    def body(door):
        folder = tmp_path_factory.mktemp("saved")
        model = door.load(models[kind], truncate_dim=8, prompts={"query": "query: "}, default_prompt_name="query",
                          similarity_fn_name="dot")
        model.save(str(folder / "model"))
        again = door.load(folder / "model")
        return (again.truncate_dim, again.prompts, again.default_prompt_name, again.similarity_fn_name,
                [type(module) for module in again], again.encode(TEXTS), again.encode_query(TEXTS))

    conform(body)


def test_pool_as_stock(conform, models):
    def body(door):  # one worker: each spawned process costs seconds of imports (test_multi_npu.py runs two)
        model = door.load(models["transformer"])
        pool = model.start_multi_process_pool(["cpu"] if door.device == "cpu" else ["npu:1"])
        try:
            return model.encode(TEXTS * 4, pool=pool, chunk_size=5), model.encode(TEXTS, pool=pool)
        finally:
            model.stop_multi_process_pool(pool)

    conform(body)
